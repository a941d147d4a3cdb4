//! Another tile configuration and schedule for a plan's sm_90a FP8 GEMMs. A plan picks each
//! GEMM's tile by a shape heuristic (`Fp8GemmParams::for_shape`) and one thread block per tile;
//! the tuner (`gemm_tuning`) times the other candidates on the device and the plan's steps are
//! redone with the fastest: the same operands, problem and arguments, with the tensor maps'
//! boxes, the grid and the raster band of the new choice.

use std::collections::HashMap;

use fathom_kernels::{
    BScaling, Fp8GemmParams, GemmGrouping, GemmOutput, GemmProblem, TensorMapDesc, TileSchedule,
};

use super::library::{LibraryKernel, LibraryPlan, LibraryStep, StepArg, count_arg};
use super::library_fp8::ordered;

/// What an FP8 GEMM's choice of tile depends on besides the device: the problem, B's scaling,
/// the output and the grouping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmForm {
    pub problem: GemmProblem,
    pub b_scaling: BScaling,
    pub output: GemmOutput,
    pub grouping: GemmGrouping,
}

impl GemmForm {
    /// The shape heuristic's parameters (what a plan launches untuned).
    pub fn default_params(&self) -> Fp8GemmParams {
        Fp8GemmParams::for_shape(
            self.problem.m,
            self.problem.n,
            self.b_scaling,
            self.output,
            self.grouping,
        )
    }

    /// What a plan launches untuned: the heuristic's tile, one block per tile.
    pub fn default_choice(&self) -> GemmChoice {
        GemmChoice {
            params: self.default_params(),
            schedule: TileSchedule::ONE_TILE_PER_BLOCK,
        }
    }

    /// Every tile configuration worth timing, the default first.
    pub fn candidates(&self) -> Vec<Fp8GemmParams> {
        Fp8GemmParams::candidates(
            self.problem.m,
            self.problem.n,
            self.b_scaling,
            self.output,
            self.grouping,
        )
    }

    /// `2·M·N·K`, all groups together (contiguous groups split M, K-grouped ones K).
    pub fn flops(&self) -> f64 {
        let GemmProblem { m, n, k, .. } = self.problem;
        2.0 * f64::from(m) * f64::from(n) * f64::from(k)
    }

    /// A stable name for files: `4096x2112x7168 g1 Block128x128 Bf16 Dense`.
    pub fn key(&self) -> String {
        let GemmProblem { m, n, k, groups } = self.problem;
        format!(
            "{m}x{n}x{k} g{groups} {:?} {:?} {:?}",
            self.b_scaling, self.output, self.grouping
        )
    }
}

/// A tile configuration and schedule for one [`GemmForm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmChoice {
    pub params: Fp8GemmParams,
    pub schedule: TileSchedule,
}

/// The form an sm_90a FP8 GEMM step computes, read back from the step: its kernel's
/// parameters, its `m`, `n`, `k` (and a K-grouped GEMM's `groups`) arguments, and for a
/// contiguous grouped GEMM the experts B's tensor map spans.
pub fn step_form(step: &LibraryStep) -> Option<GemmForm> {
    let LibraryKernel::Fp8Gemm(params) = step.kernel else {
        return None;
    };
    let named = step.named_args();
    let int = |name: &str| u32::try_from(count_arg(&named, name)?).ok();
    let (m, n, k) = (int("m")?, int("n")?, int("k")?);
    let groups = match params.grouping {
        GemmGrouping::Dense => 1,
        GemmGrouping::KGrouped => int("groups")?,
        // The experts' B matrices are stacked: `[groups · N][K]`.
        GemmGrouping::Contiguous => match named.get("tmap_b") {
            Some(StepArg::TensorMap(desc, _)) if n > 0 => {
                u32::try_from(desc.global_dims[1] / u64::from(n)).ok()?
            }
            _ => return None,
        },
    };
    Some(GemmForm {
        problem: GemmProblem { m, n, k, groups },
        b_scaling: params.b_scaling,
        output: params.output,
        grouping: params.grouping,
    })
}

/// `step` (an sm_90a FP8 GEMM) run as `choice`: every argument but the tensor maps and the
/// raster band as it was, the tensor maps over the same bytes with the new tile's boxes, the
/// grid of the new tile and schedule. The choice must compute the same form (scaling, output,
/// grouping).
pub fn with_choice(step: &LibraryStep, choice: &GemmChoice) -> Result<LibraryStep, String> {
    let LibraryKernel::Fp8Gemm(old) = step.kernel else {
        return Err(format!("{} is not an sm_90a FP8 GEMM", step.kernel.name()));
    };
    let form = step_form(step).ok_or_else(|| format!("{}: unreadable arguments", old.name()))?;
    let new = choice.params;
    if (new.b_scaling, new.output, new.grouping) != (old.b_scaling, old.output, old.grouping) {
        return Err(format!(
            "{} cannot replace {}: another scaling, output or grouping",
            new.name(),
            old.name()
        ));
    }
    let params = old.kernel_params();
    let mut named: Vec<(&str, StepArg)> = params
        .iter()
        .map(|p| p.name)
        .zip(step.args.iter().copied())
        .filter(|(name, _)| *name != "raster_band" && !name.starts_with("tmap_"))
        .collect();
    let base_of = |param: &str| {
        params
            .iter()
            .zip(&step.args)
            .find_map(|(p, arg)| match arg {
                StepArg::TensorMap(_, place) if p.name == param => Some(*place),
                _ => None,
            })
            .ok_or_else(|| format!("{}: no tensor map `{param}`", old.name()))
    };
    let descs: Vec<TensorMapDesc> = new.tensor_maps(&form.problem).map_err(|e| e.to_string())?;
    for desc in descs {
        named.push((desc.param, StepArg::TensorMap(desc, base_of(desc.param)?)));
    }
    let band = i32::try_from(choice.schedule.raster_band).map_err(|e| e.to_string())?;
    named.push(("raster_band", StepArg::I32(band)));
    Ok(LibraryStep {
        kernel: LibraryKernel::Fp8Gemm(new),
        grid: new.grid(&form.problem, &choice.schedule),
        args: ordered(&new.name(), &new.kernel_params(), &named)?,
    })
}

impl LibraryPlan {
    /// The distinct forms of the plan's sm_90a FP8 GEMMs, in order of first use.
    pub fn fp8_gemm_forms(&self) -> Vec<GemmForm> {
        let mut forms = Vec::new();
        for step in self.calls.iter().flatten().flat_map(|c| &c.steps) {
            if let Some(form) = step_form(step)
                && !forms.contains(&form)
            {
                forms.push(form);
            }
        }
        forms
    }

    /// Runs every sm_90a FP8 GEMM whose form `choices` has as that choice; how many steps
    /// changed. The plan is checked again afterwards (`check_arguments`).
    pub fn apply_gemm_choices(
        &mut self,
        choices: &HashMap<GemmForm, GemmChoice>,
    ) -> Result<usize, String> {
        let mut changed = 0;
        for call in self.calls.iter_mut().flatten() {
            for step in &mut call.steps {
                let Some(choice) = step_form(step).and_then(|form| choices.get(&form)) else {
                    continue;
                };
                let redone =
                    with_choice(step, choice).map_err(|e| format!("{}: {e}", call.name))?;
                if redone != *step {
                    *step = redone;
                    changed += 1;
                }
            }
        }
        self.check_arguments()?;
        Ok(changed)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::cuda::library::LibraryCall;
    use crate::cuda::library_fp8::Fp8Target;
    use crate::cuda::library_fp8::tests::{check_products, small_fp8_training_program};

    /// Redoes every sm_90a FP8 GEMM step of `plan` with its form's default choice and checks
    /// that gives the step back; how many there were.
    pub(crate) fn redo_every_step_by_default(plan: &LibraryPlan) -> usize {
        let mut redone = 0;
        for step in plan.calls.iter().flatten().flat_map(|c| &c.steps) {
            let Some(form) = step_form(step) else {
                continue;
            };
            let redo = with_choice(step, &form.default_choice()).unwrap();
            assert_eq!(redo, *step, "{}", form.key());
            redone += 1;
        }
        redone
    }

    fn hopper_plan() -> (fathom_compiler::kernel::Program, LibraryPlan) {
        let program = small_fp8_training_program();
        let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
        (program, plan)
    }

    /// Reading a step's form back and redoing it with the heuristic's tile and one block per
    /// tile gives the step the plan made, for every FP8 GEMM of a training step (dense, grouped,
    /// K-grouped): the form is what the planner used.
    #[test]
    fn the_default_choice_redoes_every_step_as_planned() {
        let (_, plan) = hopper_plan();
        let forms = plan.fp8_gemm_forms();
        let groupings: Vec<GemmGrouping> = forms.iter().map(|f| f.grouping).collect();
        for grouping in [
            GemmGrouping::Dense,
            GemmGrouping::Contiguous,
            GemmGrouping::KGrouped,
        ] {
            assert!(groupings.contains(&grouping), "{grouping:?}: {forms:?}");
        }
        assert!(redo_every_step_by_default(&plan) >= forms.len());
        let mut same = plan.clone();
        let defaults = forms.iter().map(|f| (*f, f.default_choice()));
        assert_eq!(same.apply_gemm_choices(&defaults.collect()), Ok(0));
        assert_eq!(same, plan);
    }

    /// Every FP8 GEMM of the training step run with another candidate tile (the widest, or a
    /// cluster pair where there is one) under a persistent schedule still gives the product of
    /// its rounded operands, read through the new tensor maps.
    #[test]
    fn other_tiles_and_schedules_give_the_same_products() {
        let (program, mut plan) = hopper_plan();
        let choices: HashMap<GemmForm, GemmChoice> = plan
            .fp8_gemm_forms()
            .into_iter()
            .map(|form| {
                let params = *form.candidates().last().unwrap();
                let schedule = TileSchedule::persistent(132, 8);
                (form, GemmChoice { params, schedule })
            })
            .collect();
        let before = plan.clone();
        let changed = plan.apply_gemm_choices(&choices).unwrap();
        assert!(changed > 0);
        assert_ne!(plan, before);
        let (checked, grouped) = check_products(&program, &plan, LibraryCall::runs_fp8_gemm);
        assert!(checked >= 20 && grouped >= 3, "{checked} {grouped}");
    }

    /// A choice of another form (here another output) is refused, naming both kernels.
    #[test]
    fn a_choice_of_another_form_is_refused() {
        let (_, plan) = hopper_plan();
        let step = plan
            .calls
            .iter()
            .flatten()
            .flat_map(|c| &c.steps)
            .find(|s| step_form(s).is_some())
            .unwrap();
        let form = step_form(step).unwrap();
        let other = GemmChoice {
            params: Fp8GemmParams {
                output: GemmOutput::Bf16,
                ..form.default_params()
            },
            schedule: TileSchedule::ONE_TILE_PER_BLOCK,
        };
        let error = with_choice(step, &other).unwrap_err();
        assert!(
            error.contains("another scaling, output or grouping"),
            "{error}"
        );
    }
}
