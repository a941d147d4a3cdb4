//! The generated `wgmma` wrapper: `wgmma.mma_async` binds every accumulator register as its own
//! inline-asm operand, so the wrapper for a tile width N (N/2 registers) is written by code rather
//! than by hand for each N.

use crate::writer::{SourceWriter, ptx_line};

pub(crate) fn wgmma_struct_name(n: u32) -> String {
    format!("WgmmaM64N{n}K32E4m3")
}

/// The `wgmma.mma_async m64nNk32 .f32.e4m3.e4m3` wrapper for one N: N/2 accumulator registers
/// bound one by one, so it is generated rather than written per N by hand.
pub(crate) fn write_wgmma_struct(w: &mut SourceWriter, n: u32) {
    let regs = n / 2;
    w.comment(format!(
        "wgmma m64n{n}k32, E4M3 x E4M3 -> F32, both operands from shared memory (K-major, 128B swizzle);\n\
         scale_d = 0 overwrites the accumulators, 1 adds to them."
    ));
    w.block_closed_by(format!("struct {}", wgmma_struct_name(n)), "};", |w| {
        w.line(format!("static constexpr int N = {n};"));
        w.block(
            format!(
                "static __device__ __forceinline__ void mma(float (&d)[{regs}], u64 desc_a, u64 desc_b, int scale_d)"
            ),
            |w| {
                w.line("asm volatile(");
                w.indented(|w| {
                    w.line(ptx_line("{"));
                    w.line(ptx_line(".reg .pred p;"));
                    w.line(ptx_line(&format!("setp.ne.b32 p, %{}, 0;", regs + 2)));
                    w.line(ptx_line(&format!("wgmma.mma_async.sync.aligned.m64n{n}k32.f32.e4m3.e4m3")));
                    let operands: Vec<String> = (0..regs).map(|i| format!("%{i}")).collect();
                    for (i, chunk) in operands.chunks(8).enumerate() {
                        let open = if i == 0 { "{" } else { "" };
                        let close = if (i + 1) * 8 >= operands.len() { "}," } else { "," };
                        w.line(ptx_line(&format!("{open}{}{close}", chunk.join(", "))));
                    }
                    w.line(ptx_line(&format!("%{}, %{}, p, 1, 1;", regs, regs + 1)));
                    w.line(ptx_line("}"));
                    let outputs: Vec<String> = (0..regs).map(|i| format!("\"+f\"(d[{i}])")).collect();
                    for (i, chunk) in outputs.chunks(8).enumerate() {
                        let lead = if i == 0 { ": " } else { "  " };
                        let tail = if (i + 1) * 8 >= outputs.len() { "" } else { "," };
                        w.line(format!("{lead}{}{tail}", chunk.join(", ")));
                    }
                    w.line(": \"l\"(desc_a), \"l\"(desc_b), \"r\"(scale_d));");
                });
            },
        );
    });
    w.blank();
}
