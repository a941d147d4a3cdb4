//! The lowering pass proper: materialisation decisions, then one kernel per materialised node
//! in graph order, with inlined producers and fused row reductions.

mod attention;
mod cross_entropy;
mod experts;
mod library;
mod short_reduce;

use crate::dtype::DType;
use std::collections::HashMap;

use crate::graph::{Graph, NodeId, Op, inverse_permutation};
use crate::kernel::{Buffer, BufferId, BufferRole, Expr, KernelBody, Program, Stmt, View};

use super::exact::exact_operands;
use super::merge::{Pending, merge_adjacent};
use super::{
    Affine, Class, KernelBuilder, LowerError, LowerOptions, StridedView, class, load, new_buffer,
    push_kernel, temporary, what,
};
use cross_entropy::KeptExponentials;

/// An elementwise node whose inlined expression has at most this many ops, all [`cheap`], is
/// computed in every kernel that reads it instead of being stored once and loaded by each:
/// memory traffic costs more than a few additions (the masked, scaled attention scores feed
/// both the row max and the exponentials; backward reuses sums and products several times).
const DUPLICATE_MAX_OPS: usize = 4;
/// ... and at most this many users, so a value is not recomputed without bound.
const DUPLICATE_MAX_USERS: usize = 4;

/// What a kernel computes and loads for an inlined node.
#[derive(Clone, Debug, Default)]
struct Inlined {
    ops: usize,
    /// The stored values it reads at full size (each once, however often it appears).
    reads: Vec<NodeId>,
}

/// Where a node may be written in an assembled buffer (see `Lowering::decide_places`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// Its place as part `part` of concatenation or stack `assembly`.
    Part { assembly: NodeId, part: usize },
    /// The elements of the place of its one user, a reshape or permute of it: the node is
    /// written so that the movement reads its place.
    Under(NodeId),
}

/// Ops worth recomputing rather than storing: a handful of cycles, no call, no division.
fn cheap(op: &Op) -> bool {
    use crate::graph::{BinaryOp, UnaryOp};
    match op {
        Op::Unary(u) => matches!(u, UnaryOp::Neg | UnaryOp::Abs),
        Op::Binary(b) => !matches!(b, BinaryOp::Div),
        Op::Compare(_) | Op::Select => true,
        _ => false,
    }
}

pub(super) struct Lowering<'g> {
    graph: &'g Graph,
    classes: Vec<Class>,
    users: Vec<Vec<NodeId>>,
    live: Vec<bool>,
    materialise: Vec<bool>,
    /// The buffer view of every node that has one: materialised nodes and movements of them.
    views: Vec<Option<StridedView>>,
    /// Per node, where in a concatenation's or stack's buffer its producer may write it,
    /// instead of into a buffer of its own (see `decide_places`).
    place: Vec<Option<Place>>,
    /// Whether the node was written in its `place`, so the assembly copies nothing for it.
    placed: Vec<bool>,
    /// The view of every concatenation or stack whose buffer exists: made when the first part
    /// is written into it, or when the assembly is emitted.
    assembled: Vec<Option<StridedView>>,
    /// Nodes the grouped matmuls read or write as one matrix per expert, never lowered on
    /// their own (see `decide_weight_parts`): stacks of parameters and the permutes of them
    /// the calls read through; the slices of a weight gradient and their reshapes.
    in_parts: Vec<bool>,
    /// The casts of round trips to bf16 that the products reading them round themselves
    /// (see `fold_round_trips`): views of what they round, like movements.
    folded: Vec<bool>,
    /// Per weight-gradient node written in parts (or, in the CUDA plan's form, holding its
    /// experts' gradients as windows), its experts' gradients (the reshapes) in expert order.
    gradient_parts: Vec<Option<Vec<NodeId>>>,
    /// The stacks of parameters the caller feeds as one buffer, and their parameters (see
    /// `decide_weight_parts`).
    fed_in_stack: Vec<bool>,
    /// Per cross-entropy whose gradient reads what its forward kept (see
    /// `LowerOptions::cross_entropy_keeps_exponentials`): the rows' exponentials and sums.
    kept_exponentials: HashMap<NodeId, KeptExponentials>,
    options: LowerOptions,
    program: Program,
    /// The kernels emitted so far, in order; named and put in the program by `finish`.
    kernels: Vec<Pending>,
}

impl<'g> Lowering<'g> {
    pub(super) fn new(graph: &'g Graph, options: LowerOptions) -> Self {
        let n = graph.nodes.len();
        let classes: Vec<Class> = graph
            .nodes
            .iter()
            .map(|node| class(&node.op, node.ty.numel()))
            .collect();
        let mut users = vec![Vec::new(); n];
        for id in graph.node_ids() {
            for &input in &graph.node(id).inputs {
                users[input.index()].push(id);
            }
        }
        // Liveness: only what the outputs need.
        let mut live = vec![false; n];
        for output in &graph.outputs {
            live[output.node.index()] = true;
        }
        for id in graph.node_ids().rev() {
            if live[id.index()] {
                for &input in &graph.node(id).inputs {
                    live[input.index()] = true;
                }
            }
        }
        for list in &mut users {
            list.retain(|u| live[u.index()]);
        }
        Lowering {
            graph,
            classes,
            users,
            live,
            materialise: vec![false; n],
            views: vec![None; n],
            place: vec![None; n],
            placed: vec![false; n],
            assembled: vec![None; n],
            in_parts: vec![false; n],
            folded: vec![false; n],
            gradient_parts: vec![None; n],
            fed_in_stack: vec![false; n],
            kept_exponentials: HashMap::new(),
            options,
            program: Program {
                name: graph.name.clone(),
                ..Program::default()
            },
            kernels: Vec::new(),
        }
    }

    /// The program, its adjacent loop nests merged (see `merge`).
    pub(super) fn finish(mut self) -> Program {
        for kernel in merge_adjacent(self.kernels) {
            push_kernel(&mut self.program, kernel);
        }
        self.program
    }

    pub(super) fn run(&mut self) -> Result<(), LowerError> {
        if self.options.products_round_operands {
            self.fold_round_trips();
        }
        self.decide();
        self.inline_into_one_kernel();
        self.decide_places();
        self.decide_weight_parts();
        for id in self.graph.node_ids() {
            if self.live[id.index()] {
                self.visit(id)?;
            }
        }
        for output in &self.graph.outputs {
            let buffer = self.views[output.node.index()]
                .as_ref()
                .map(|v| v.buffer)
                .expect("outputs are materialised");
            self.program.outputs.push((output.name.clone(), buffer));
        }
        Ok(())
    }

    /// The round trips to bf16, `cast<f32>(cast<bf16>(x))`, that the products reading them
    /// round themselves (`LowerOptions::products_round_operands`): both casts become views of
    /// `x`, like movements, and no kernel stores the rounded values. A round trip is folded
    /// when the narrowing cast is read by the widening one alone, `x` is f32, and every use of
    /// the round trip, through permutes and reshapes, is an operand of a product on bf16
    /// values that sums exactly (Hopper's emulated accumulation takes no rounding operands).
    /// (An `x` without a buffer — a movement of an inlined expression — leaves the round trip
    /// without a view, and a loop stores the rounded values as before.)
    fn fold_round_trips(&mut self) {
        for id in self.graph.node_ids() {
            let node = self.graph.node(id);
            if !self.live[id.index()] || node.op != (Op::Cast { to: DType::F32 }) {
                continue;
            }
            let narrow = node.inputs[0];
            let narrowing = self.graph.node(narrow);
            if narrowing.op != (Op::Cast { to: DType::BF16 })
                || self.users[narrow.index()] != [id]
                || self.graph.is_output(narrow)
            {
                continue;
            }
            let source = narrowing.inputs[0];
            if self.ty(source).dtype == DType::F32 && self.read_by_rounding_products(id) {
                for cast in [narrow, id] {
                    self.classes[cast.index()] = Class::Movement;
                    self.folded[cast.index()] = true;
                }
            }
        }
    }

    /// Whether every use of `id`, through permutes and reshapes, is an operand of a product on
    /// bf16 values with exact sums, and none is a graph output.
    fn read_by_rounding_products(&self, id: NodeId) -> bool {
        !self.graph.is_output(id)
            && self.users[id.index()].iter().all(|&u| {
                let user = self.graph.node(u);
                let exact_sums = match user.op {
                    Op::Permute { .. } | Op::Reshape { .. } => {
                        return self.read_by_rounding_products(u);
                    }
                    Op::MatMul { accumulation, .. }
                    | Op::GroupedMatMul { accumulation }
                    | Op::GroupedMatMulWeightGrad { accumulation, .. } => accumulation.is_exact(),
                    _ => return false,
                };
                let (a, b) = (user.inputs[0], user.inputs[1]);
                exact_sums
                    && user.inputs[2..].iter().all(|&other| other != id)
                    && exact_operands(self.graph, a, b) == Some(DType::BF16)
            })
    }

    /// Whether a product on `exact_in` values rounds its operands as it reads them.
    fn rounds(&self, exact_in: Option<DType>) -> bool {
        self.options.products_round_operands && exact_in == Some(DType::BF16)
    }

    /// Which nodes get a buffer of their own.
    fn decide(&mut self) {
        // Per node, what its users' kernels do when it is inlined: `None` when that is not
        // cheap (see `DUPLICATE_MAX_OPS`), else the ops computed and the full-size values read.
        let mut inlined: Vec<Option<Inlined>> = vec![None; self.graph.nodes.len()];
        // Per node, whether it is computed elementwise from leaves (parameters, inputs,
        // constants) alone.
        let mut of_leaves = vec![false; self.graph.nodes.len()];
        for id in self.graph.node_ids() {
            let i = id.index();
            let node = self.graph.node(id);
            let users = &self.users[i];
            let inlinable_by = |user: &NodeId| {
                matches!(
                    self.classes[user.index()],
                    Class::Elementwise | Class::Reduce
                ) || matches!(
                    self.graph.node(*user).op,
                    Op::Permute { .. } | Op::Slice { .. } | Op::Expand { .. }
                )
            };
            let expression = match self.classes[i] {
                Class::Elementwise if cheap(&node.op) => {
                    let mut expression = Inlined {
                        ops: 1,
                        reads: Vec::new(),
                    };
                    let mut all_cheap = true;
                    for input in &node.inputs {
                        let Some(operand) = &inlined[input.index()] else {
                            all_cheap = false;
                            break;
                        };
                        expression.ops += operand.ops;
                        // A smaller operand is broadcast: a few values, read from cache.
                        if self.graph.ty(*input).numel() == node.ty.numel() {
                            for &r in &operand.reads {
                                if !expression.reads.contains(&r) {
                                    expression.reads.push(r);
                                }
                            }
                        }
                    }
                    all_cheap.then_some(expression)
                }
                Class::Movement => inlined[node.inputs[0].index()].clone(),
                Class::Scalar => Some(Inlined::default()),
                _ => None,
            };
            // Read by several kernels, each computing it again: cheaper than a store and the
            // loads when it is a few cheap ops on one full-size value (a masked, scaled score),
            // not when it would make each reader load several (a residual sum).
            let duplicated = expression
                .as_ref()
                .is_some_and(|e| e.ops <= DUPLICATE_MAX_OPS && e.reads.len() <= 1)
                && users.len() <= DUPLICATE_MAX_USERS
                && users
                    .iter()
                    .all(|u| matches!(self.classes[u.index()], Class::Elementwise | Class::Reduce));
            // A value computed elementwise from leaves alone and read only through a permute
            // (a weight rounded to bf16, then transposed for `x · Wᵀ`) is stored in the
            // leaves' own order, the permute a view of it: inlined into the permute, it would
            // be a transposing copy, four times slower per element.
            of_leaves[i] = match self.classes[i] {
                Class::Leaf => true,
                Class::Elementwise => node
                    .inputs
                    .iter()
                    .all(|p| of_leaves[p.index()] || self.classes[p.index()] == Class::Scalar),
                _ => false,
            };
            let of_leaves_through_permute = self.classes[i] == Class::Elementwise
                && of_leaves[i]
                && matches!(users[..], [u] if matches!(self.graph.node(u).op, Op::Permute { .. }));
            self.materialise[i] = match self.classes[i] {
                Class::Leaf | Class::Library | Class::Assemble | Class::CrossEntropy => true,
                Class::Scalar => false,
                // Computed once, then read by several users or by one that needs memory.
                Class::Elementwise if of_leaves_through_permute => true,
                Class::Elementwise => !duplicated && (users.len() != 1 || !inlinable_by(&users[0])),
                Class::Reduce => users.len() != 1 || !inlinable_by(&users[0]),
                // Movements are views; one is copied only when it must be an output.
                Class::Movement => false,
            } || self.graph.is_output(id);
            inlined[i] = if self.materialise[i] {
                Some(Inlined {
                    ops: 0,
                    reads: vec![id],
                })
            } else {
                expression
            };
        }
    }

    /// A value of one cheap op on stored values, read by several nodes that all end up in one
    /// kernel (the SwiGLU backward's `g · up`, read by both terms of the gate's gradient), is
    /// computed there wherever it is read, rather than stored by a kernel of its own and
    /// loaded back: that kernel loads its operands instead, and a store, a load and a launch
    /// go. The values are the same to the bit (the op is computed from the same operands; a
    /// stored f32 is read back exactly).
    fn inline_into_one_kernel(&mut self) {
        /// Where a node's value is computed: the materialised node whose kernel it is inlined
        /// into, or several kernels.
        #[derive(Clone, Copy, PartialEq)]
        enum Home {
            Nowhere,
            One(NodeId),
            Several,
        }
        let mut home = vec![Home::Nowhere; self.graph.nodes.len()];
        let ids: Vec<NodeId> = self.graph.node_ids().collect();
        for &id in ids.iter().rev() {
            let i = id.index();
            if !self.live[i] {
                continue;
            }
            let users = &self.users[i];
            let homes = users.iter().map(|u| home[u.index()]);
            let shared = homes.fold(Home::Nowhere, |acc, h| match (acc, h) {
                (Home::Nowhere, h) => h,
                (acc, Home::Nowhere) => acc,
                (Home::One(a), Home::One(b)) if a == b => acc,
                _ => Home::Several,
            });
            let node = self.graph.node(id);
            let of_stored_values = node
                .inputs
                .iter()
                .all(|p| self.materialise[p.index()] || self.classes[p.index()] == Class::Scalar);
            let inline = self.materialise[i]
                && self.classes[i] == Class::Elementwise
                && cheap(&node.op)
                && of_stored_values
                && !self.graph.is_output(id)
                && users.len() >= 2
                && matches!(shared, Home::One(_))
                && users
                    .iter()
                    .all(|u| matches!(self.classes[u.index()], Class::Elementwise | Class::Reduce));
            if inline {
                self.materialise[i] = false;
            }
            home[i] = if self.materialise[i] {
                Home::One(id)
            } else {
                shared
            };
        }
    }

    /// Which parts of concatenations and stacks are written by their producer straight into
    /// their place in the assembled buffer, which spares the part a buffer of its own and the
    /// assembly a copy loop. A part qualifies when the lowering would otherwise compute it into
    /// a temporary only to copy it: the result of a loop kernel (elementwise ops, a reduction,
    /// a movement of an inlined expression, autodiff's broadcast zeros: a fill), of a matmul
    /// (whose output is a strided view) or a nested concatenation or stack; that is no graph
    /// output, appears once in the assembly, and whose other users, if any, load it through
    /// whatever view it has (elementwise and row kernels, cross-entropies, matmuls). Inputs,
    /// parameters and constants, the other library results (written whole into buffers of
    /// their own), values read twice by assemblies or through movements (a reshape may need a
    /// dense copy; a view could be another part of the same assembly) and views of other
    /// buffers keep their copy loop.
    ///
    /// No kernel may write a buffer it reads other than element for element through the view
    /// it stores (the JIT streams a row where the row evaluator computes it whole, the GPU runs
    /// the points in parallel, a library call takes its output buffer out while it runs): a
    /// producer whose kernel reads the buffer of its place — another part, written there
    /// before — writes a buffer of its own instead (`store_view`, `emit_matmul`), and is
    /// copied. A copy loop never reads the buffer it writes: what it copies is not written in
    /// place, and is no movement of what is.
    fn decide_places(&mut self) {
        let producer = |this: &Self, id: NodeId| {
            !this.graph.is_output(id)
                && match this.classes[id.index()] {
                    Class::Elementwise | Class::Reduce | Class::Movement | Class::Assemble => true,
                    Class::Library => matches!(this.graph.node(id).op, Op::MatMul { .. }),
                    Class::Leaf | Class::Scalar | Class::CrossEntropy => false,
                }
        };
        for id in self.graph.node_ids() {
            if !self.live[id.index()] || self.classes[id.index()] != Class::Assemble {
                continue;
            }
            let parts = &self.graph.node(id).inputs;
            for (i, &part) in parts.iter().enumerate() {
                let once = parts.iter().filter(|&&q| q == part).count() == 1;
                let others_load = self.users[part.index()]
                    .iter()
                    .filter(|&&u| u != id)
                    .all(|u| {
                        matches!(
                            self.classes[u.index()],
                            Class::Elementwise | Class::Reduce | Class::CrossEntropy
                        ) || matches!(self.graph.node(*u).op, Op::MatMul { .. })
                    });
                if !(once && others_load && producer(self, part)) {
                    continue;
                }
                self.place[part.index()] = Some(Place::Part {
                    assembly: id,
                    part: i,
                });
                // A reshape or permute placed there is a view of its operand when that is
                // stored where the movement reads it: the operand takes the place under it
                // (autodiff reshapes the gradients it concatenates; a matmul's result may be
                // concatenated transposed), when the movement is its only user.
                let mut movement = part;
                while matches!(
                    self.graph.node(movement).op,
                    Op::Reshape { .. } | Op::Permute { .. }
                ) {
                    let source = self.graph.node(movement).inputs[0];
                    if self.users[source.index()] != [movement] || !producer(self, source) {
                        break;
                    }
                    self.place[source.index()] = Some(Place::Under(movement));
                    movement = source;
                }
            }
        }
    }

    fn ty(&self, id: NodeId) -> &crate::dtype::TensorType {
        self.graph.ty(id)
    }

    fn dims(&self, id: NodeId) -> &[usize] {
        self.graph.ty(id).dims()
    }

    /// Emits what node `id` needs, in graph order.
    fn visit(&mut self, id: NodeId) -> Result<(), LowerError> {
        if self.in_parts[id.index()] {
            // Read or written where its parts lie by the grouped matmuls.
            return Ok(());
        }
        if self.fed_in_stack[id.index()] {
            self.feed_in_stack(id);
            return Ok(());
        }
        let node = self.graph.node(id);
        match self.classes[id.index()] {
            Class::Leaf => {
                let role = match &node.op {
                    Op::Input { name } => BufferRole::Input(name.clone()),
                    Op::Parameter { name, .. } => BufferRole::Parameter(name.clone()),
                    Op::Constant(data) => BufferRole::Constant(data.clone()),
                    _ => unreachable!("leaf class"),
                };
                let buffer = new_buffer(
                    &mut self.program,
                    Buffer {
                        ty: node.ty.clone(),
                        role,
                    },
                );
                self.views[id.index()] = Some(StridedView::contiguous(buffer, node.ty.dims()));
            }
            Class::Movement => {
                // A movement of something with a view is a view; otherwise it is inlined.
                let source = node.inputs[0];
                if let Some(view) = self.views[source.index()].clone() {
                    let moved = match &node.op {
                        Op::Permute { perm } => Some(view.permute(perm)),
                        Op::Slice { axis, start, end } => Some(view.slice(*axis, *start, *end)),
                        Op::Expand { shape } => Some(view.expand(shape)),
                        Op::Reshape { shape } => view.reshape(shape),
                        // A folded round trip: the products reading it round `x`.
                        Op::Cast { .. } => Some(view),
                        _ => unreachable!("movement class"),
                    };
                    // An operand written under the movement's place puts the movement there.
                    self.placed[id.index()] = moved.is_some()
                        && self.placed[source.index()]
                        && self.place[source.index()] == Some(Place::Under(id));
                    self.views[id.index()] = moved;
                }
                if let (None, Op::Reshape { shape }) = (&self.views[id.index()], &node.op)
                    && (self.needs_view(id) || self.materialise[id.index()])
                {
                    // Strides that cannot be re-split: copy the source densely once, and
                    // the reshape is a view of the copy.
                    let buffer = self.dense(source)?;
                    let dense = StridedView::contiguous(buffer, self.dims(source));
                    self.views[id.index()] = dense.reshape(shape);
                }
                // An output that is the whole of a temporary written for it alone (a matmul
                // laid out in the movement's order, see `library_output`) is that buffer.
                if self.whole_temporary_of_its_source(id) {
                    self.materialise[id.index()] = false;
                }
                let needs_memory = self.materialise[id.index()]
                    || (self.views[id.index()].is_none() && self.needs_view(id));
                if needs_memory {
                    self.materialise[id.index()] = true;
                    self.emit_loop(id)?;
                }
            }
            Class::Elementwise | Class::Reduce => {
                if self.materialise[id.index()] || self.needs_view(id) {
                    self.materialise[id.index()] = true;
                    self.emit_loop(id)?;
                }
            }
            Class::Scalar => {}
            Class::Library => self.emit_library(id)?,
            Class::Assemble => self.emit_assemble(id)?,
            Class::CrossEntropy => self.emit_cross_entropy(id)?,
        }
        Ok(())
    }

    /// Whether movement `id`'s view is the whole of a temporary buffer of `id`'s type, in
    /// row-major order, whose node (`id`'s source) nothing else reads and is no output: then
    /// `id` may be that buffer rather than a copy of it.
    fn whole_temporary_of_its_source(&self, id: NodeId) -> bool {
        let source = self.graph.node(id).inputs[0];
        let Some(view) = &self.views[id.index()] else {
            return false;
        };
        let buffer = &self.program.buffers[view.buffer.index()];
        view.is_contiguous()
            && buffer.ty == *self.graph.ty(id)
            && buffer.role == BufferRole::Temporary
            && self.users[source.index()] == [id]
            && !self.graph.is_output(source)
    }

    /// Whether a user of `id` reads it through memory (a library call, a reshape, a
    /// concatenation), so it must be a view of a buffer. A concatenation fills the place of a
    /// broadcast constant (autodiff's zeros) with the value instead.
    fn needs_view(&self, id: NodeId) -> bool {
        self.users[id.index()]
            .iter()
            .any(|u| match self.classes[u.index()] {
                Class::Library => true,
                Class::Assemble => !self.broadcast_constant(id),
                _ => matches!(self.graph.node(*u).op, Op::Reshape { .. }),
            })
    }

    /// Whether `id` is a one-element constant seen through broadcasts, permutes and slices:
    /// a value every kernel computes inline, reading no memory.
    fn broadcast_constant(&self, mut id: NodeId) -> bool {
        loop {
            match (&self.classes[id.index()], &self.graph.node(id).op) {
                (Class::Scalar, _) => return true,
                (_, Op::Expand { .. } | Op::Permute { .. } | Op::Slice { .. }) => {
                    id = self.graph.node(id).inputs[0];
                }
                _ => return false,
            }
        }
    }

    /// A loop nest computing node `id` into a new buffer, or into its place in an assembled
    /// buffer (see `decide_places`).
    fn emit_loop(&mut self, id: NodeId) -> Result<(), LowerError> {
        let node = self.graph.node(id);
        // A node without a place gets its buffer first, as it always has (buffer numbers in
        // the printed programs stay put); one with a place finds out once its kernel is built.
        let own = self.place[id.index()]
            .is_none()
            .then(|| self.own_buffer(id));
        // The kernel but its store, the value stored, the map of the store and, for a
        // reduction, its axis and whether the result keeps it.
        let (k, value, map, reduced) = match (&node.op, self.unrolled_reduction(id)?) {
            // A short reduction spelled out over the output's domain.
            (_, Some((k, value))) => (k, value, Affine::identity(node.ty.rank()), None),
            (Op::Reduce { op, axis, keep_dim }, None) => {
                // Loop over the input with the reduced axis innermost.
                let input = node.inputs[0];
                let in_dims = self.dims(input).to_vec();
                let rank = in_dims.len();
                let order: Vec<usize> = (0..rank).filter(|a| a != axis).chain([*axis]).collect();
                let domain: Vec<usize> = order.iter().map(|&a| in_dims[a]).collect();
                // order[j] is the input axis at domain position j; invert for the map.
                let mut position = vec![0; rank];
                for (j, &a) in order.iter().enumerate() {
                    position[a] = j;
                }
                let map = Affine::picking(&position, rank);
                let mut k = KernelBuilder::new(domain);
                k.nodes.push(id);
                let value = self.expr(&mut k, input, &map)?;
                let row = k.rows.len();
                k.rows.push(Stmt::Reduce {
                    row,
                    op: *op,
                    value,
                });
                let map = map.without_axis_dependence(*axis, rank);
                (k, Expr::Row(row), map, Some((*axis, *keep_dim)))
            }
            (_, None) => {
                let rank = node.ty.rank();
                let map = Affine::identity(rank);
                let mut k = KernelBuilder::new(node.ty.dims().to_vec());
                k.nodes.push(id);
                let value = self.expand_node(&mut k, id, &map)?;
                (k, value, map, None)
            }
        };
        let out = match own {
            Some(out) => out,
            None => self.store_view(id, &k, &value),
        };
        let store = match reduced {
            // The output at (outer axes), constant along the innermost one.
            Some((axis, keep_dim)) => Stmt::StoreRow {
                view: if keep_dim {
                    out.compose(&map)
                } else {
                    out.unsqueeze(axis).compose(&map)
                },
                value,
            },
            None => Stmt::Store {
                view: out.compose(&map),
                value,
            },
        };
        let (nest, nodes) = k.into_loop(vec![store]);
        self.push_node_kernel(id, what(&node.op), nodes, KernelBody::Loop(nest));
        self.views[id.index()] = Some(out);
        Ok(())
    }

    /// A new buffer for node `id`, and its whole view.
    fn own_buffer(&mut self, id: NodeId) -> StridedView {
        let ty = self.ty(id).clone();
        let buffer = new_buffer(&mut self.program, temporary(&ty));
        StridedView::contiguous(buffer, ty.dims())
    }

    /// Where the loop kernel `k` computing node `id` (its row statements, and `value` to
    /// store) stores: the node's place in an assembled buffer when the kernel reads nothing of
    /// that buffer, else a new buffer.
    fn store_view(&mut self, id: NodeId, k: &KernelBuilder, value: &Expr) -> StridedView {
        if let Some(place) = self.place_view(id)
            && !kernel_reads(k, value, place.buffer)
        {
            self.placed[id.index()] = true;
            return place;
        }
        self.own_buffer(id)
    }

    /// The view of node `id`'s place in the buffer of the assembly that holds it, if it has a
    /// place (the assembly's buffer is made on first use).
    fn place_view(&mut self, id: NodeId) -> Option<StridedView> {
        match self.place[id.index()]? {
            Place::Part { assembly, part } => {
                let whole = self.assembled_view(assembly);
                Some(self.part_view(assembly, part, &whole))
            }
            // The movement's place seen through the inverse movement (a reshape back may not
            // be a view: then the node has no place).
            Place::Under(movement) => {
                let view = self.place_view(movement)?;
                match &self.graph.node(movement).op {
                    Op::Permute { perm } => Some(view.permute(&inverse_permutation(perm))),
                    Op::Reshape { .. } => view.reshape(self.dims(id)),
                    _ => unreachable!("placed under a reshape or permute"),
                }
            }
        }
    }

    /// The view of concatenation or stack `id`: its place in an enclosing assembly, or a new
    /// buffer; the same view every time it is asked for.
    fn assembled_view(&mut self, id: NodeId) -> StridedView {
        if let Some(view) = &self.assembled[id.index()] {
            return view.clone();
        }
        let view = match self.place_view(id) {
            Some(view) => {
                self.placed[id.index()] = true;
                view
            }
            None => self.own_buffer(id),
        };
        self.assembled[id.index()] = Some(view.clone());
        view
    }

    /// Part `part` of the view `whole` of concatenation or stack `id`.
    fn part_view(&self, id: NodeId, part: usize, whole: &StridedView) -> StridedView {
        let node = self.graph.node(id);
        match &node.op {
            Op::Concat { axis } => {
                let start: usize = node.inputs[..part]
                    .iter()
                    .map(|&p| self.dims(p)[*axis])
                    .sum();
                let end = start + self.dims(node.inputs[part])[*axis];
                whole.slice(*axis, start, end)
            }
            Op::Stack => whole
                .slice(0, part, part + 1)
                .reshape(self.dims(node.inputs[part]))
                .expect("a stack's slot drops its leading axis of 1"),
            _ => unreachable!("assemble class"),
        }
    }

    /// The value of node `id` at the coordinates `map` gives, reading materialised nodes from
    /// memory and inlining the rest.
    fn expr(
        &mut self,
        k: &mut KernelBuilder,
        id: NodeId,
        map: &Affine,
    ) -> Result<Expr, LowerError> {
        let node = self.graph.node(id);
        if let Op::Constant(data) = &node.op
            && data.values.len() == 1
        {
            return Ok(Expr::Constant(data.values[0]));
        }
        if let Some(view) = &self.views[id.index()] {
            return Ok(load(view, map));
        }
        if let Op::Reduce { .. } = node.op {
            return self.row_value(k, id, map);
        }
        k.nodes.push(id);
        self.expand_node(k, id, map)
    }

    /// Node `id`'s own computation, with its operands as expressions.
    fn expand_node(
        &mut self,
        k: &mut KernelBuilder,
        id: NodeId,
        map: &Affine,
    ) -> Result<Expr, LowerError> {
        let node = self.graph.node(id);
        let dims = node.ty.dims().to_vec();
        let operand = |this: &mut Self, k: &mut KernelBuilder, i: usize| {
            let input = node.inputs[i];
            let operand_map = map.broadcast_to_operand(&dims, this.dims(input));
            this.expr(k, input, &operand_map)
        };
        Ok(match &node.op {
            Op::Unary(op) => Expr::Unary(*op, Box::new(operand(self, k, 0)?)),
            Op::Binary(op) => {
                let a = operand(self, k, 0)?;
                let b = operand(self, k, 1)?;
                Expr::Binary(*op, Box::new(a), Box::new(b))
            }
            Op::Compare(op) => {
                let a = operand(self, k, 0)?;
                let b = operand(self, k, 1)?;
                Expr::Compare(*op, Box::new(a), Box::new(b))
            }
            Op::Select => {
                let c = operand(self, k, 0)?;
                let a = operand(self, k, 1)?;
                let b = operand(self, k, 2)?;
                Expr::Select(Box::new(c), Box::new(a), Box::new(b))
            }
            Op::Cast { to } => Expr::Cast(*to, Box::new(operand(self, k, 0)?)),
            Op::Permute { perm } => self.expr(k, node.inputs[0], &map.through_permute(perm))?,
            Op::Slice { axis, start, .. } => {
                self.expr(k, node.inputs[0], &map.through_slice(*axis, *start))?
            }
            Op::Expand { .. } | Op::StopGradient => operand(self, k, 0)?,
            Op::Reshape { .. } => {
                // A reshape materialised for its own sake (a graph output) whose source view
                // re-splits: read through that view, one copy.
                if let Some(view) = self.views[id.index()].clone() {
                    return Ok(load(&view, map));
                }
                // The source has no view (an inlined expression), or one whose strides cannot
                // be re-split (a transposed tensor merged across the transposition): copy it
                // densely, then re-view it.
                let source = node.inputs[0];
                let buffer = self.dense(source)?;
                let view = StridedView::contiguous(buffer, self.dims(source))
                    .reshape(&dims)
                    .expect("a contiguous buffer reshapes");
                load(&view, map)
            }
            Op::Reduce { .. } => {
                // A materialised reduction is emitted by `emit_loop`; here only via `force`.
                return Err(self.unsupported(id, "a reduction cannot be the root of a store"));
            }
            _ => return Err(self.unsupported(id, "not an elementwise or movement op")),
        })
    }

    /// A reduction used inside another kernel: a per-row value when the kernel's innermost
    /// axis is the reduced one and nothing else moves along it; otherwise its own kernel.
    fn row_value(
        &mut self,
        k: &mut KernelBuilder,
        id: NodeId,
        map: &Affine,
    ) -> Result<Expr, LowerError> {
        if let Some(&row) = k.row_of.get(&id) {
            return Ok(Expr::Row(row));
        }
        let node = self.graph.node(id);
        let Op::Reduce { op, axis, keep_dim } = node.op else {
            unreachable!("reduce")
        };
        let input = node.inputs[0];
        let in_dims = self.dims(input).to_vec();
        let rank = k.domain.len();
        let inner = rank.wrapping_sub(1);
        // The map to the input: the reduced axis runs along the domain's innermost axis.
        let mut input_map = map.clone();
        if !keep_dim {
            input_map.offset.insert(axis, 0);
            input_map.coef.insert(axis, vec![0; rank]);
        }
        let fusable = rank > 0 && !input_map.depends_on(inner) && in_dims[axis] == k.domain[inner];
        if !fusable {
            self.force(id)?;
            let view = self.views[id.index()].clone().expect("forced");
            return Ok(load(&view, map));
        }
        input_map.coef[axis] = (0..rank).map(|i| isize::from(i == inner)).collect();
        input_map.offset[axis] = 0;
        k.nodes.push(id);
        let value = self.expr(k, input, &input_map)?;
        let row = k.rows.len();
        k.rows.push(Stmt::Reduce { row, op, value });
        k.row_of.insert(id, row);
        Ok(Expr::Row(row))
    }

    /// Gives node `id` a buffer now (its kernel runs before the one being built).
    fn force(&mut self, id: NodeId) -> Result<(), LowerError> {
        if self.views[id.index()].is_none() {
            self.materialise[id.index()] = true;
            self.emit_loop(id)?;
        }
        Ok(())
    }

    /// The view of an operand a library call reads, copying it first if it has none.
    fn operand_view(&mut self, id: NodeId) -> Result<StridedView, LowerError> {
        self.force(id)?;
        Ok(self.views[id.index()].clone().expect("forced"))
    }

    /// Concat and stack: one copy loop per part into its place in the output, but for the
    /// parts written there by their producer (see `decide_places`).
    fn emit_assemble(&mut self, id: NodeId) -> Result<(), LowerError> {
        let inputs = self.graph.node(id).inputs.clone();
        let whole = self.assembled_view(id);
        let kind = what(&self.graph.node(id).op);
        for (i, &part) in inputs.iter().enumerate() {
            if self.placed[part.index()]
                && self.place[part.index()]
                    == Some(Place::Part {
                        assembly: id,
                        part: i,
                    })
            {
                continue;
            }
            let target = self.part_view(id, i, &whole);
            let map = Affine::identity(self.ty(part).rank());
            let mut k = KernelBuilder::new(self.dims(part).to_vec());
            let value = self.expr(&mut k, part, &map)?;
            debug_assert!(
                !kernel_reads(&k, &value, target.buffer),
                "the copy of part {i} of {id} reads the buffer it writes"
            );
            k.nodes.push(id);
            let (nest, nodes) = k.into_loop(vec![Stmt::Store {
                view: target.compose(&map),
                value,
            }]);
            self.push_node_kernel(id, kind, nodes, KernelBody::Loop(nest));
        }
        self.views[id.index()] = Some(whole);
        Ok(())
    }

    /// Appends a kernel computing (part of) node `id`, named `what` and placed at the node's
    /// origin in the model.
    fn push_node_kernel(
        &mut self,
        id: NodeId,
        what: &'static str,
        nodes: Vec<NodeId>,
        body: KernelBody,
    ) {
        self.kernels.push(Pending {
            origin: self.graph.node(id).origin.clone(),
            whats: vec![what],
            nodes,
            body,
        });
    }

    fn unsupported(&self, id: NodeId, reason: &str) -> LowerError {
        LowerError::Unsupported {
            node: id,
            op: self.graph.node(id).op.name(),
            reason: reason.to_owned(),
        }
    }
}

impl Affine {
    /// This map with domain axes feeding `axis` of a `rank`-axis tensor cut off — used to store
    /// a reduction's result, which does not move along the reduced axis.
    pub(super) fn without_axis_dependence(&self, axis: usize, _rank: usize) -> Affine {
        let mut out = self.clone();
        out.offset[axis] = 0;
        out.coef[axis] = vec![0; self.domain_rank()];
        out
    }
}

/// Whether a loop kernel being built, `k` (its row statements) with `value` to store, loads
/// from `buffer`.
fn kernel_reads(k: &KernelBuilder, value: &Expr, buffer: BufferId) -> bool {
    let mut reads = false;
    let mut visit = |view: &View| reads |= view.buffer == buffer;
    value.for_each_load(&mut visit);
    for stmt in &k.rows {
        stmt.value().for_each_load(&mut visit);
    }
    reads
}
