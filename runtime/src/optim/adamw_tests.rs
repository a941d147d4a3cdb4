#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use super::*;
use crate::optim::is_balancing_bias;
use crate::weights::Weights;

type Params = BTreeMap<String, HostTensor>;
type State = Vec<(String, HostTensor)>;

fn f32_config(weight_decay: f64) -> AdamWConfig {
    AdamWConfig {
        weight_decay,
        moments: MomentPrecision::F32,
        ..AdamWConfig::default()
    }
}

fn values<'a>(params: &'a Params, name: &str) -> &'a [f32] {
    params[name].as_f32().unwrap()
}

fn grads(entries: &[(&str, &[f32])]) -> Grads {
    entries
        .iter()
        .map(|(n, g)| ((*n).to_owned(), g.to_vec()))
        .collect()
}

fn optimizer(config: AdamWConfig, params: &Params) -> AdamW {
    AdamW::new(config, params.iter().map(|(n, t)| (n.as_str(), t))).unwrap()
}

/// The brief's formula in f64: decay first, then the bias-corrected Adam update.
fn reference(p0: &[f64], grads: &[&[f64]], lr: f64, wd: f64) -> Vec<f64> {
    let (b1, b2, eps) = (0.9, 0.95, 1e-8);
    let mut p = p0.to_vec();
    let mut m = vec![0.0; p.len()];
    let mut v = vec![0.0; p.len()];
    for (t, g) in grads.iter().enumerate() {
        let t = (t + 1) as i32;
        for i in 0..p.len() {
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let m_hat = m[i] / (1.0 - b1.powi(t));
            let v_hat = v[i] / (1.0 - b2.powi(t));
            p[i] -= lr * wd * p[i];
            p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
    }
    p
}

#[test]
fn two_steps_match_the_formula_with_and_without_decay() {
    let lr = 1e-2;
    let mut params = Params::new();
    params.insert("w".into(), HostTensor::f32([1, 2], vec![0.5, -2.0]));
    params.insert("n".into(), HostTensor::f32([2], vec![1.0, 3.0]));
    let mut opt = optimizer(f32_config(0.1), &params);
    let steps: [[&[f32]; 2]; 2] = [[&[0.2, -0.1], &[1.0, 0.0]], [&[-0.3, 0.05], &[0.5, 2.0]]];
    for [gw, gn] in steps {
        opt.step(&mut params, &grads(&[("w", gw), ("n", gn)]), lr)
            .unwrap();
    }
    assert_eq!(opt.step_count(), 2);
    let widen = |g: &[f32]| g.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    let gw: Vec<Vec<f64>> = steps.iter().map(|s| widen(s[0])).collect();
    let gn: Vec<Vec<f64>> = steps.iter().map(|s| widen(s[1])).collect();
    // "w" is a matrix and decays; "n" is a vector and does not.
    let want_w = reference(&[0.5, -2.0], &[&gw[0], &gw[1]], lr, 0.1);
    let want_n = reference(&[1.0, 3.0], &[&gn[0], &gn[1]], lr, 0.0);
    for (got, want) in [
        (values(&params, "w"), want_w),
        (values(&params, "n"), want_n),
    ] {
        for (&g, w) in got.iter().zip(want) {
            assert!((f64::from(g) - w).abs() < 1e-6, "{got:?} vs {w}");
        }
    }
    // The decay made a difference of lr * wd * p per step on "w".
    let no_decay = reference(&[0.5, -2.0], &[&gw[0], &gw[1]], lr, 0.0);
    assert!((no_decay[1] - f64::from(values(&params, "w")[1])).abs() > 3e-3);
}

/// Produced with PyTorch 2.15.0 (CPU, float32, default single-tensor implementation):
/// ```python
/// w = torch.tensor([[0.5, -1.25], [2.0, 0.0]], requires_grad=True)
/// n = torch.tensor([1.0, -0.75], requires_grad=True)
/// opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1},
///                          {"params": [n], "weight_decay": 0.0}],
///                         lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
/// for gw, gn in zip(GW, GN):
///     w.grad, n.grad = torch.tensor(gw), torch.tensor(gn)
///     opt.step()  # then print repr(np.float32(x)) of every value
/// ```
#[test]
fn three_steps_match_pytorch() {
    const GW: [[f32; 4]; 3] = [
        [0.1, -0.2, 0.3, 1e-3],
        [-0.05, 0.4, 0.3, -2.0],
        [0.2, 0.0, -0.1, 0.5],
    ];
    const GN: [[f32; 2]; 3] = [[0.5, -1.0], [0.25, 0.0], [-0.125, 2.0]];
    const TORCH_W: [[f32; 4]; 3] = [
        [0.49895, -1.2488749, 1.9987999, -0.0009999899],
        [0.49863175, -1.2491133, 1.9976, -0.0002652607],
        [0.49793315, -1.249273, 1.9967879, 0.00013710168],
    ];
    const TORCH_N: [[f32; 2]; 3] = [
        [0.999, -0.749],
        [0.9980607, -0.74832135],
        [0.9974867, -0.74865633],
    ];
    let mut params = Params::new();
    params.insert(
        "w".into(),
        HostTensor::f32([2, 2], vec![0.5, -1.25, 2.0, 0.0]),
    );
    params.insert("n".into(), HostTensor::f32([2], vec![1.0, -0.75]));
    // wd 0.1 for both: the rank rule keeps it off the vector, as the torch groups do.
    let mut opt = optimizer(f32_config(0.1), &params);
    for step in 0..3 {
        let g = grads(&[("w", &GW[step]), ("n", &GN[step])]);
        opt.step(&mut params, &g, 1e-3).unwrap();
        for (name, want) in [("w", &TORCH_W[step][..]), ("n", &TORCH_N[step][..])] {
            for (&got, &want) in values(&params, name).iter().zip(want) {
                // Bit for bit: the arithmetic is PyTorch's.
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "step {step} {name}: {got:e} vs torch {want:e}"
                );
            }
        }
    }
}

fn is_bf16(x: f32) -> bool {
    bf16::from_f32(x).to_f32().to_bits() == x.to_bits()
}

#[test]
fn bf16_moments_stay_bf16_and_close_to_f32() {
    let mut p16 = Params::new();
    p16.insert(
        "w".into(),
        HostTensor::f32([2, 3], vec![0.1, -0.2, 0.3, 0.4, -0.5, 0.6]),
    );
    let mut p32 = p16.clone();
    let mut o16 = optimizer(AdamWConfig::default(), &p16);
    let mut o32 = optimizer(f32_config(0.1), &p32);
    for step in 0..5 {
        let g: Vec<f32> = (0..6)
            .map(|i| ((i * 7 + step * 3) % 11) as f32 * 0.037 - 0.2)
            .collect();
        let g = grads(&[("w", &g)]);
        o16.step(&mut p16, &g, 1e-3).unwrap();
        o32.step(&mut p32, &g, 1e-3).unwrap();
        let Moments::Bf16 { m, .. } = &o16.slots["w"].moments else {
            panic!("bf16 moments are stored as bf16")
        };
        assert_eq!(m.len(), 6);
        for (name, t) in o16.state_tensors() {
            if name != STEP {
                assert!(t.as_f32().unwrap().iter().all(|&x| is_bf16(x)), "{name}");
            }
        }
        for (a, b) in values(&p16, "w").iter().zip(values(&p32, "w")) {
            assert!((a - b).abs() < 2e-5, "{a} vs {b}");
        }
    }
    assert_ne!(values(&p16, "w"), values(&p32, "w"), "bf16 rounding shows");
}

fn round_trip_continues_bit_exactly(config: AdamWConfig) {
    let mut weights = Weights::new();
    weights.insert(
        "a.weight",
        HostTensor::f32([2, 2], vec![0.3, -0.7, 1.1, 0.05]),
    );
    weights.insert("norm.weight", HostTensor::f32([3], vec![1.0, 0.9, 1.2]));
    weights.insert(
        "mlp.gate.e_score_correction_bias",
        HostTensor::f32([2], vec![0.0, 0.0]),
    );
    let trainable = weights.iter().filter(|(n, _)| !is_balancing_bias(n));
    let mut opt = AdamW::new(config, trainable).unwrap();
    assert_eq!(
        opt.trainable().collect::<Vec<_>>(),
        ["a.weight", "norm.weight"]
    );
    let g = |s: usize| {
        let f = |i: usize| ((i * 5 + s * 13) % 17) as f32 * 0.01 - 0.08;
        grads(&[
            ("a.weight", &(0..4).map(f).collect::<Vec<_>>()),
            ("norm.weight", &(4..7).map(f).collect::<Vec<_>>()),
        ])
    };
    for s in 0..2 {
        opt.step(&mut weights, &g(s), 1e-3).unwrap();
    }
    let state = opt.state_tensors();
    let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "adamw.m.a.weight",
            "adamw.m.norm.weight",
            "adamw.step",
            "adamw.v.a.weight",
            "adamw.v.norm.weight"
        ]
    );
    assert_eq!(state[2].1, HostTensor::i64(Vec::new(), vec![2]));
    assert_eq!(state[0].1.dims(), [2, 2]);
    // Restore from the tensors in another order, as a checkpoint may give them.
    let mut restored = AdamW::from_state(config, state.into_iter().rev()).unwrap();
    assert_eq!(restored, opt);
    restored.check_params(&weights).unwrap();
    let mut copy = weights.clone();
    for s in 2..5 {
        opt.step(&mut weights, &g(s), 1e-3).unwrap();
        restored.step(&mut copy, &g(s), 1e-3).unwrap();
    }
    for (name, t) in weights.iter() {
        let bits = |t: &HostTensor| {
            t.as_f32()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(t), bits(copy.get(name).unwrap()), "{name}");
    }
    assert_eq!(restored.state_tensors(), opt.state_tensors());
    assert_eq!(
        weights
            .get("mlp.gate.e_score_correction_bias")
            .unwrap()
            .as_f32(),
        Some(&[0.0f32, 0.0][..])
    );
}

#[test]
fn state_round_trip_f32() {
    round_trip_continues_bit_exactly(f32_config(0.1));
}

#[test]
fn state_round_trip_bf16() {
    round_trip_continues_bit_exactly(AdamWConfig::default());
}

#[test]
fn step_errors_name_the_parameter_and_change_nothing() {
    let mut params = Params::new();
    params.insert("a".into(), HostTensor::f32([2, 2], vec![1.0; 4]));
    params.insert("b".into(), HostTensor::f32([2], vec![1.0; 2]));
    let mut opt = optimizer(AdamWConfig::default(), &params);
    let before = (params.clone(), opt.clone());
    let ok_a: &[f32] = &[0.1; 4];
    let mut err =
        |g: Grads, lr: f64, params: &mut Params| opt.step(params, &g, lr).unwrap_err().to_string();

    let e = err(grads(&[("a", ok_a)]), 1e-3, &mut params);
    assert_eq!(e, "no gradient for trainable parameter `b`");
    let e = err(
        grads(&[("a", ok_a), ("b", &[0.1; 2]), ("c", &[0.1])]),
        1e-3,
        &mut params,
    );
    assert_eq!(e, "gradient for `c`, which is not a trainable parameter");
    let e = err(grads(&[("a", ok_a), ("b", &[0.1; 3])]), 1e-3, &mut params);
    assert_eq!(e, "gradient for `b` has 3 values, expected 2");
    let e = err(
        grads(&[("a", ok_a), ("b", &[0.1; 2])]),
        f64::NAN,
        &mut params,
    );
    assert!(e.starts_with("invalid lr = NaN"), "{e}");
    assert_eq!((&params, &opt), (&before.0, &before.1));

    let good = grads(&[("a", ok_a), ("b", &[0.1; 2])]);
    let mut other = params.clone();
    other.remove("b");
    let e = opt.step(&mut other, &good, 1e-3).unwrap_err().to_string();
    assert_eq!(e, "trainable parameter `b` is missing from the parameters");
    other.insert("b".into(), HostTensor::f32([1, 2], vec![1.0; 2]));
    let e = opt.step(&mut other, &good, 1e-3).unwrap_err().to_string();
    assert_eq!(
        e,
        "parameter `b`: shape [1, 2] differs from its optimizer state's [2]"
    );
    other.insert("b".into(), HostTensor::i64([2], vec![1; 2]));
    let e = opt.step(&mut other, &good, 1e-3).unwrap_err().to_string();
    assert_eq!(e, "parameter `b`: is i64[2]; master weights must be f32");
    assert_eq!(opt, before.1);

    let bad = HostTensor {
        ty: params["b"].ty.clone(),
        data: Data::Float(vec![1.0]),
    };
    let e = AdamW::new(AdamWConfig::default(), [("x", &bad)])
        .unwrap_err()
        .to_string();
    assert_eq!(e, "parameter `x`: holds 1 values for f32[2]");
    let t = &params["a"];
    let e = AdamW::new(AdamWConfig::default(), [("x", t), ("x", t)]).unwrap_err();
    assert_eq!(e.to_string(), "parameter `x` is given twice");
}

#[test]
fn from_state_refuses_bad_state_naming_the_tensor() {
    let mut params = Params::new();
    params.insert("p".into(), HostTensor::f32([2], vec![1.0, 2.0]));
    let mut opt = optimizer(AdamWConfig::default(), &params);
    opt.step(&mut params, &grads(&[("p", &[0.1, -0.3])]), 1e-3)
        .unwrap();
    let state = opt.state_tensors();
    let config = AdamWConfig::default();
    let refused = |edit: &dyn Fn(&mut State)| {
        let mut s = state.clone();
        edit(&mut s);
        AdamW::from_state(config, s).unwrap_err().to_string()
    };
    let e = refused(&|s| s.retain(|(n, _)| n != "adamw.step"));
    assert_eq!(e, "optimizer state lacks `adamw.step`");
    let e = refused(&|s| s.retain(|(n, _)| n != "adamw.v.p"));
    assert_eq!(e, "optimizer state lacks `adamw.v.p`");
    let e = refused(&|s| s.retain(|(n, _)| n != "adamw.m.p"));
    assert_eq!(e, "optimizer state lacks `adamw.m.p`");
    let e = refused(&|s| s[2].1 = HostTensor::f32([1, 2], vec![0.0; 2]));
    assert_eq!(
        e,
        "optimizer state tensor `adamw.v.p`: shape [1, 2] differs from the first moment's [2]"
    );
    let e = refused(&|s| s[1].1 = HostTensor::i64([1], vec![1]));
    assert_eq!(
        e,
        "optimizer state tensor `adamw.step`: must be a non-negative i64 scalar"
    );
    let e = refused(&|s| s[1].1 = HostTensor::i64(Vec::new(), vec![-1]));
    assert!(e.contains("non-negative i64 scalar"), "{e}");
    let e = refused(&|s| s[0].1 = HostTensor::i64([2], vec![0; 2]));
    assert_eq!(
        e,
        "optimizer state tensor `adamw.m.p`: must be an f32 tensor"
    );
    let e = refused(&|s| s[0].1 = HostTensor::f32([2], vec![0.1, 0.0]));
    assert_eq!(
        e,
        "optimizer state tensor `adamw.m.p`: holds values not representable in bf16"
    );
    let e = refused(&|s| s.push(("adam.x".into(), HostTensor::f32([1], vec![0.0]))));
    assert_eq!(
        e,
        "optimizer state tensor `adam.x`: not an AdamW state tensor"
    );
    let e = refused(&|s| s.push(s[0].clone()));
    assert_eq!(e, "optimizer state tensor `adamw.m.p`: given twice");
    // f32 moments accept any value; a bad config is refused before the tensors are read.
    let mut s = state.clone();
    s[0].1 = HostTensor::f32([2], vec![0.1, 0.0]);
    AdamW::from_state(f32_config(0.1), s).unwrap();
    let bad = AdamWConfig {
        beta2: 1.0,
        ..config
    };
    assert_eq!(
        AdamW::from_state(bad, state).unwrap_err().to_string(),
        "invalid beta2 = 1: must be in [0, 1)"
    );
}

#[test]
fn the_fma_instruction_and_fmaf_update_alike() {
    let s = UpdateScalars {
        decay: 0.999,
        one_minus_beta1: 0.1,
        beta2: 0.95,
        one_minus_beta2: 0.05,
        bc2_sqrt: 0.3,
        eps: 1e-8,
        neg_step_size: -1e-3,
    };
    let n = 1000;
    let wave = |seed: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * seed).sin()).collect() };
    let (p0, g) = (wave(0.37), wave(1.13));
    let (m0, v0): (Vec<f32>, Vec<f32>) = (wave(0.71), wave(0.29).iter().map(|x| x * x).collect());
    let run = |dispatched: bool| {
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        if dispatched {
            update_serial(&mut p, &g, &mut m, &mut v, &s, true);
        } else {
            update_elements(&mut p, &g, &mut m, &mut v, &s, true);
        }
        [p, m, v].map(|x| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
    };
    assert_eq!(run(true), run(false));
}
