//! What an instantiated template is: [`KernelSource`], its architecture requirement, launch shape
//! and parameter list, and how the embedded templates and the generated wrapper become one `.cu`.

use crate::writer::SourceWriter;

/// The GPU generation a kernel needs, and the architecture it is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ArchRequirement {
    /// Hopper with its architecture-specific features (`wgmma` on FP8, TMA, `setmaxnreg`):
    /// compiled for `sm_90a`, runs on compute capability 9.0 only.
    Sm90a,
    /// Ampere or newer (`mma.sync`, `cp.async`, `ldmatrix`): compiled for `sm_80`, runs on any GPU
    /// of compute capability 8.0 or more.
    Sm80OrNewer,
}

impl ArchRequirement {
    /// The NVRTC `--gpu-architecture` value that produces a CUBIN for this requirement.
    pub fn compile_arch(self) -> &'static str {
        match self {
            ArchRequirement::Sm90a => "sm_90a",
            ArchRequirement::Sm80OrNewer => "sm_80",
        }
    }

    /// Whether a device of compute capability `major.minor` can run the kernel.
    pub fn supports(self, major: u32, minor: u32) -> bool {
        match self {
            ArchRequirement::Sm90a => (major, minor) == (9, 0),
            ArchRequirement::Sm80OrNewer => major >= 8,
        }
    }
}

/// Element type behind a kernel pointer parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    /// FP8 E4M3 bytes.
    E4m3,
    Bf16,
    F32,
    I32,
    F64,
}

impl Elem {
    /// Bytes of one element.
    pub fn bytes(self) -> usize {
        match self {
            Elem::E4m3 => 1,
            Elem::Bf16 => 2,
            Elem::F32 | Elem::I32 => 4,
            Elem::F64 => 8,
        }
    }

    /// The short name in kernel names: `e4m3`, `bf16`, `f32`, `i32`, `f64`.
    pub(crate) fn tag(self) -> &'static str {
        match self {
            Elem::E4m3 => "e4m3",
            Elem::Bf16 => "bf16",
            Elem::F32 => "f32",
            Elem::I32 => "i32",
            Elem::F64 => "f64",
        }
    }

    pub(crate) fn c_type(self) -> &'static str {
        match self {
            Elem::E4m3 => "u8",
            Elem::Bf16 => "bf16",
            Elem::F32 => "float",
            Elem::I32 => "int",
            Elem::F64 => "double",
        }
    }
}

/// Type of one kernel parameter, in launch order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamType {
    /// A device pointer the kernel only reads.
    ConstPtr(Elem),
    /// A device pointer the kernel writes (or reads and writes).
    MutPtr(Elem),
    I32,
    /// A 64-bit integer (`long long`): element strides and offsets of large tensors.
    I64,
    F32,
    F64,
    /// A 128-byte `CUtensorMap` passed by value (`const __grid_constant__`).
    TensorMap,
}

impl ParamType {
    fn c_decl(self, name: &str) -> String {
        match self {
            ParamType::ConstPtr(e) => format!("const {}* __restrict__ {name}", e.c_type()),
            ParamType::MutPtr(e) => format!("{}* __restrict__ {name}", e.c_type()),
            ParamType::I32 => format!("int {name}"),
            ParamType::I64 => format!("long long {name}"),
            ParamType::F32 => format!("float {name}"),
            ParamType::F64 => format!("double {name}"),
            ParamType::TensorMap => format!("const __grid_constant__ fathom::TensorMap {name}"),
        }
    }
}

/// One parameter of an entry point.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelParam {
    pub name: &'static str,
    pub ty: ParamType,
}

impl KernelParam {
    pub(crate) fn new(name: &'static str, ty: ParamType) -> Self {
        Self { name, ty }
    }
}

/// An instantiated template: complete, self-contained CUDA C++ (the templates it uses are inlined;
/// only the CUDA headers `cuda_fp16.h`, `cuda_bf16.h` and `cuda_fp8.h` come from the include path),
/// with one `extern "C" __global__` entry point.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelSource {
    /// Deterministic name derived from the template parameters, e.g.
    /// `fp8_gemm_1x128_128x128_m128n128k128_s4_bf16`.
    pub name: String,
    /// The `.cu` text given to NVRTC.
    pub source: String,
    /// The entry point's symbol (unmangled: `extern "C"`).
    pub entry: String,
    /// Which GPUs it needs; also which architecture it is compiled for.
    pub arch_requirement: ArchRequirement,
    /// Threads per block the kernel is written for (also its `__launch_bounds__`).
    pub block_threads: u32,
    /// Dynamic shared memory per block in bytes; above 48 KiB the launcher must first raise
    /// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
    pub dynamic_smem_bytes: u32,
    /// The entry point's parameters in order.
    pub params: Vec<KernelParam>,
}

/// Marks where the generated part of a source starts (after the embedded templates).
const GENERATED_MARKER: &str = " (generated) ----";

impl KernelSource {
    /// The generated part of the source (extra definitions and the entry point), without the
    /// embedded templates: what differs between instantiations of one template.
    pub fn generated_wrapper(&self) -> &str {
        self.source
            .find(GENERATED_MARKER)
            .and_then(|at| self.source[..at].rfind("// ----"))
            .map_or(self.source.as_str(), |start| &self.source[start..])
    }
}

/// An embedded template file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Template {
    pub file: &'static str,
    pub text: &'static str,
}

pub(crate) const COMMON: Template = Template {
    file: "common.cuh",
    text: include_str!("../cuda/common.cuh"),
};
pub(crate) const HOPPER: Template = Template {
    file: "hopper.cuh",
    text: include_str!("../cuda/hopper.cuh"),
};

/// The generated entry point: signature and the call into the template body.
pub(crate) struct EntryPoint<'a> {
    pub name: &'a str,
    pub block_threads: u32,
    /// Thread blocks per cluster along x (`__cluster_dims__`; 1: no clusters).
    pub cluster_x: u32,
    pub params: &'a [KernelParam],
    /// Statements of the body, one per line.
    pub body: Vec<String>,
}

/// A portable (`sm_80` or newer) kernel: one entry point `name` of `threads` threads that runs
/// the statement `body`, no dynamic shared memory, described by `description`.
pub(crate) fn portable_kernel(
    name: &str,
    description: String,
    templates: &[Template],
    (threads, params): (u32, &[KernelParam]),
    body: String,
) -> KernelSource {
    assemble(
        &[description],
        templates,
        |_| {},
        EntryPoint {
            name,
            block_threads: threads,
            cluster_x: 1,
            params,
            body: vec![body],
        },
        ArchRequirement::Sm80OrNewer,
        0,
    )
}

/// Assembles a [`KernelSource`]: a header naming the instantiation, the CUDA includes, each
/// template verbatim (without its `#pragma once`), extra generated definitions, the entry point.
pub(crate) fn assemble(
    description: &[String],
    templates: &[Template],
    definitions: impl FnOnce(&mut SourceWriter),
    entry: EntryPoint<'_>,
    arch_requirement: ArchRequirement,
    dynamic_smem_bytes: u32,
) -> KernelSource {
    let mut w = SourceWriter::new();
    w.comment(format!(
        "{} -- generated by fathom-kernels {}; do not edit.",
        entry.name,
        env!("CARGO_PKG_VERSION")
    ));
    for line in description {
        w.comment(line);
    }
    w.comment(format!("Compile for {}.", arch_requirement.compile_arch()));
    w.blank();
    for template in templates {
        w.comment(format!("---- {} ----", template.file));
        let body: String = template
            .text
            .lines()
            .filter(|line| line.trim() != "#pragma once")
            .map(|line| format!("{line}\n"))
            .collect();
        w.verbatim(&body);
        w.blank();
    }
    w.comment(format!("---- {}{GENERATED_MARKER}", entry.name));
    definitions(&mut w);
    let cluster = if entry.cluster_x > 1 {
        format!("__cluster_dims__({}, 1, 1) ", entry.cluster_x)
    } else {
        String::new()
    };
    w.line(format!(
        "extern \"C\" __global__ void __launch_bounds__({}, 1) {cluster}{}(",
        entry.block_threads, entry.name
    ));
    w.indented(|w| {
        w.indented(|w| {
            w.comma_list(entry.params.iter().map(|p| p.ty.c_decl(p.name)), ") {");
        });
        for statement in &entry.body {
            w.line(statement);
        }
    });
    w.line("}");
    KernelSource {
        name: entry.name.to_owned(),
        source: w.finish(),
        entry: entry.name.to_owned(),
        arch_requirement,
        block_threads: entry.block_threads,
        dynamic_smem_bytes,
        params: entry.params.to_vec(),
    }
}

/// Errors of template instantiation: parameters the template cannot take, or a problem shape a
/// kernel cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("{template}: invalid parameter `{field}` = {value}: expected {expected}")]
    InvalidParam {
        template: &'static str,
        field: &'static str,
        value: String,
        expected: String,
    },
    #[error("{template}: unsupported problem `{field}` = {value}: expected {expected}")]
    InvalidProblem {
        template: &'static str,
        field: &'static str,
        value: String,
        expected: String,
    },
}

/// Checks one parameter: `Ok` when `ok`, otherwise an [`KernelError::InvalidParam`].
pub(crate) fn check_param(
    ok: bool,
    template: &'static str,
    field: &'static str,
    value: impl std::fmt::Display,
    expected: &str,
) -> Result<(), KernelError> {
    if ok {
        Ok(())
    } else {
        Err(KernelError::InvalidParam {
            template,
            field,
            value: value.to_string(),
            expected: expected.to_owned(),
        })
    }
}

/// Checks one problem dimension: `Ok` when `ok`, otherwise an [`KernelError::InvalidProblem`].
pub(crate) fn check_problem(
    ok: bool,
    template: &'static str,
    field: &'static str,
    value: impl std::fmt::Display,
    expected: &str,
) -> Result<(), KernelError> {
    if ok {
        Ok(())
    } else {
        Err(KernelError::InvalidProblem {
            template,
            field,
            value: value.to_string(),
            expected: expected.to_owned(),
        })
    }
}

/// `value` as a C++ boolean literal (template arguments).
pub(crate) fn cpp_bool(value: bool) -> &'static str {
    if value { "true" } else { "false" }
}
