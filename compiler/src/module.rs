//! Modules: structs of parameters and sub-modules, declared under checkpoint names.
//!
//! A module is declared once (its parameters become graph nodes named like a Hugging Face
//! checkpoint: `model.layers.0.self_attn.q_a_proj.weight`) and then applied with a `forward`
//! method of its own, which adds compute nodes tagged with the module's path.
//! `#[derive(Module)]` writes the declaration and parameter listing for user structs.

use crate::dtype::{DType, TensorType};
use crate::error::GraphError;
use crate::graph::{GraphBuilder, Tensor};

/// A declared parameter: its graph node and checkpoint name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub tensor: Tensor,
    pub name: String,
}

/// Something with parameters that can be declared under a checkpoint path.
pub trait Module: Sized {
    /// What the declaration needs to know (sizes, flags).
    type Config: ?Sized;

    /// Declares the module's parameters under `scope`'s path.
    fn declare(scope: &mut Scope<'_>, config: &Self::Config) -> Result<Self, GraphError>;

    /// Calls `visit` on every parameter, in declaration order.
    fn visit_parameters(&self, visit: &mut dyn FnMut(&Param));

    /// Every parameter, in declaration order.
    fn parameters(&self) -> Vec<Param> {
        let mut all = Vec::new();
        self.visit_parameters(&mut |p| all.push(p.clone()));
        all
    }
}

impl Module for Param {
    /// The parameter's shape.
    type Config = [usize];

    fn declare(scope: &mut Scope<'_>, shape: &[usize]) -> Result<Self, GraphError> {
        let name = scope.path.clone();
        let tensor = scope
            .builder
            .parameter(&name, TensorType::new(DType::F32, shape))?;
        Ok(Param { tensor, name })
    }

    fn visit_parameters(&self, visit: &mut dyn FnMut(&Param)) {
        visit(self)
    }
}

/// A list of like modules named `prefix.0`, `prefix.1`, ... (layers, experts).
impl<M> Module for Vec<M>
where
    M: Module,
    M::Config: Sized,
{
    /// How many, and the config of each.
    type Config = (usize, M::Config);

    fn declare(scope: &mut Scope<'_>, (count, config): &Self::Config) -> Result<Self, GraphError> {
        (0..*count)
            .map(|i| M::declare(&mut scope.child(&i.to_string()), config))
            .collect()
    }

    fn visit_parameters(&self, visit: &mut dyn FnMut(&Param)) {
        for m in self {
            m.visit_parameters(visit);
        }
    }
}

/// Where a module is being declared: the builder and the dotted checkpoint path.
#[derive(Debug)]
pub struct Scope<'g> {
    builder: &'g mut GraphBuilder,
    path: String,
}

impl<'g> Scope<'g> {
    /// The top-level scope (empty path).
    pub fn root(builder: &'g mut GraphBuilder) -> Self {
        Scope {
            builder,
            path: String::new(),
        }
    }

    /// The scope of a sub-module: `self.path + "." + name`.
    pub fn child(&mut self, name: &str) -> Scope<'_> {
        let path = if self.path.is_empty() {
            name.to_owned()
        } else if name.is_empty() {
            self.path.clone()
        } else {
            format!("{}.{name}", self.path)
        };
        Scope {
            builder: self.builder,
            path,
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn builder(&mut self) -> &mut GraphBuilder {
        self.builder
    }

    /// Declares a sub-module under `name`.
    pub fn declare<M: Module>(&mut self, name: &str, config: &M::Config) -> Result<M, GraphError> {
        M::declare(&mut self.child(name), config)
    }

    /// Declares an f32 parameter `path.name` of the given shape.
    pub fn param(&mut self, name: &str, shape: &[usize]) -> Result<Param, GraphError> {
        self.declare::<Param>(name, shape)
    }

    /// Declares an f32 buffer `path.name`: loaded and saved with the weights, never given a
    /// gradient.
    pub fn buffer(&mut self, name: &str, shape: &[usize]) -> Result<Param, GraphError> {
        let name = self.child(name).path;
        let tensor = self
            .builder
            .buffer(&name, TensorType::new(DType::F32, shape))?;
        Ok(Param { tensor, name })
    }
}
