//! Activations (docs/enclave-program.md, "Activations"), applied in place.

/// A resolved activation. `Softmax` carries its axis geometry: the buffer is viewed
/// as `[outer, axis_len, inner]` and normalised along the middle axis.
#[derive(Clone, Debug, PartialEq)]
pub enum Act {
    Linear,
    Relu,
    Relu6,
    LeakyRelu(f32),
    Elu(f32),
    Selu,
    Gelu,
    GeluTanh,
    Sigmoid,
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    /// x · clip(x / 6 + 1/2, 0, 1) (Keras hard_silu, ONNX HardSwish).
    HardSwish,
    Tanh,
    Swish,
    Softmax {
        axis_len: usize,
        inner: usize,
    },
    Clip {
        min: f32,
        max: f32,
    },
    Exp,
    Log,
    Sqrt,
    Abs,
    Neg,
    Reciprocal,
    Erf,
    /// 1 − erf(x), computed directly (no cancellation for large x).
    Erfc,
    /// `cast` to bool: 1 where x ≠ 0 (NaN included), else 0.
    CastBool,
    /// `cast` to an integer type: truncation toward zero, clamped to `[min, max]`
    /// (the type's range as float32); NaN becomes 0.
    CastInt {
        min: f32,
        max: f32,
    },
}

const SELU_ALPHA: f32 = 1.673_263_2;
const SELU_SCALE: f32 = 1.050_701;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
fn map(x: &mut [f32], f: impl Fn(f32) -> f32) {
    for v in x.iter_mut() {
        *v = f(*v);
    }
}

impl Act {
    pub fn is_linear(&self) -> bool {
        matches!(self, Act::Linear)
    }

    /// Apply in place to `x`.
    /// Apply on `threads` threads (of the current rayon pool) when `x` is large and the
    /// function costly; softmax blocks are never split.
    pub fn apply_par(&self, x: &mut [f32], threads: usize) {
        let cheap = matches!(
            self,
            Act::Linear | Act::Relu | Act::Relu6 | Act::LeakyRelu(_) | Act::Clip { .. }
        );
        let block = match self {
            Act::Softmax { axis_len, inner } => axis_len * inner,
            _ => 1,
        };
        if cheap || threads < 2 || block == 0 || x.len() < 1 << 14 || !x.len().is_multiple_of(block)
        {
            self.apply(x);
            return;
        }
        super::par_row_ranges(x, block, threads, &|_, rows| self.apply(rows));
    }

    pub fn apply(&self, x: &mut [f32]) {
        match *self {
            Act::Linear => {}
            Act::Relu => map(x, |v| if v > 0.0 { v } else { 0.0 }),
            Act::Relu6 => map(x, |v| v.clamp(0.0, 6.0)),
            Act::LeakyRelu(a) => map(x, |v| if v >= 0.0 { v } else { a * v }),
            Act::Elu(a) => map(x, |v| if v > 0.0 { v } else { a * v.exp_m1() }),
            Act::Selu => map(x, |v| {
                SELU_SCALE * if v > 0.0 { v } else { SELU_ALPHA * v.exp_m1() }
            }),
            Act::Gelu => super::vmath::gelu(x),
            Act::GeluTanh => super::vmath::gelu_tanh(x),
            Act::Sigmoid => map(x, sigmoid),
            Act::HardSigmoid { alpha, beta } => map(x, |v| (alpha * v + beta).clamp(0.0, 1.0)),
            Act::HardSwish => map(x, |v| v * (v / 6.0 + 0.5).clamp(0.0, 1.0)),
            Act::Tanh => map(x, f32::tanh),
            Act::Swish => map(x, |v| v * sigmoid(v)),
            Act::Softmax { axis_len, inner } => softmax(x, axis_len, inner),
            Act::Clip { min, max } => map(x, |v| v.max(min).min(max)),
            Act::Exp => map(x, f32::exp),
            Act::Log => map(x, f32::ln),
            Act::Sqrt => map(x, f32::sqrt),
            Act::Abs => map(x, f32::abs),
            Act::Neg => map(x, |v| -v),
            Act::Reciprocal => map(x, |v| 1.0 / v),
            Act::Erf => map(x, libm::erff),
            Act::Erfc => map(x, |v| libm::erfc(v as f64) as f32),
            Act::CastBool => map(x, |v| if v != 0.0 { 1.0 } else { 0.0 }),
            Act::CastInt { min, max } => map(x, |v| {
                if v.is_nan() {
                    0.0
                } else {
                    v.trunc().clamp(min, max)
                }
            }),
        }
    }
}

/// Softmax over the middle axis of `[outer, axis_len, inner]`.
pub fn softmax(x: &mut [f32], axis_len: usize, inner: usize) {
    let block = axis_len * inner;
    if block == 0 {
        return;
    }
    if inner == 1 {
        super::vmath::softmax_rows(x, axis_len);
        return;
    }
    // Along an inner axis: columns j of each [axis_len, inner] block.
    for chunk in x.chunks_exact_mut(block) {
        for j in 0..inner {
            let mut m = f32::NEG_INFINITY;
            for a in 0..axis_len {
                m = m.max(chunk[a * inner + j]);
            }
            let mut s = 0.0f32;
            for a in 0..axis_len {
                let v = (chunk[a * inner + j] - m).exp();
                chunk[a * inner + j] = v;
                s += v;
            }
            let r = 1.0 / s;
            for a in 0..axis_len {
                chunk[a * inner + j] *= r;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(a: Act, x: &[f32]) -> Vec<f32> {
        let mut v = x.to_vec();
        a.apply(&mut v);
        v
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn simple_activations() {
        let x = [-2.0, -0.5, 0.0, 0.5, 7.0];
        close(&run(Act::Relu, &x), &[0.0, 0.0, 0.0, 0.5, 7.0]);
        close(&run(Act::Relu6, &x), &[0.0, 0.0, 0.0, 0.5, 6.0]);
        close(&run(Act::LeakyRelu(0.2), &x), &[-0.4, -0.1, 0.0, 0.5, 7.0]);
        close(
            &run(
                Act::Clip {
                    min: -1.0,
                    max: 1.0,
                },
                &x,
            ),
            &[-1.0, -0.5, 0.0, 0.5, 1.0],
        );
        close(&run(Act::Neg, &x), &[2.0, 0.5, 0.0, -0.5, -7.0]);
        close(&run(Act::Abs, &x), &[2.0, 0.5, 0.0, 0.5, 7.0]);
        close(
            &run(
                Act::HardSigmoid {
                    alpha: 1.0 / 6.0,
                    beta: 0.5,
                },
                &x,
            ),
            &[1.0 / 6.0, 0.5 - 0.5 / 6.0, 0.5, 0.5 + 0.5 / 6.0, 1.0],
        );
        close(&run(Act::Sigmoid, &[0.0]), &[0.5]);
        close(
            &run(Act::HardSwish, &[-4.0, -1.5, 0.0, 1.5, 4.0]),
            &[0.0, -0.375, 0.0, 1.125, 4.0],
        );
        close(&run(Act::Swish, &[0.0, 1.0]), &[0.0, 0.731_058_6]);
        close(
            &run(Act::Elu(1.0), &[-1.0, 2.0]),
            &[(-1.0f32).exp_m1(), 2.0],
        );
        close(&run(Act::Selu, &[1.0]), &[SELU_SCALE]);
        close(&run(Act::Erf, &[0.0, 1.0]), &[0.0, 0.842_700_8]);
        close(
            &run(Act::Erfc, &[0.0, 1.0, -1.0]),
            &[1.0, 0.157_299_2, 1.842_700_8],
        );
        // Far in the tail 1 - erf(x) is 0 in float32; erfc keeps its relative accuracy.
        let t = run(Act::Erfc, &[5.0, 9.0]);
        close(
            &[t[0] / 1.537_459_8e-12, t[1] / 4.137_031_7e-37],
            &[1.0, 1.0],
        );
        close(&run(Act::Gelu, &[0.0, 1.0]), &[0.0, 0.841_344_7]);
        close(&run(Act::GeluTanh, &[1.0]), &[0.841_192]);
        close(&run(Act::Reciprocal, &[4.0]), &[0.25]);
        close(&run(Act::Sqrt, &[4.0]), &[2.0]);
        let x = [-2.5, -0.5, 0.0, 0.7, 3e9, f32::NAN];
        assert_eq!(run(Act::CastBool, &x), [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]);
        let i32_range = Act::CastInt {
            min: i32::MIN as f32,
            max: i32::MAX as f32,
        };
        assert_eq!(
            run(i32_range, &x),
            [-2.0, -0.0, 0.0, 0.0, i32::MAX as f32, 0.0]
        );
    }

    #[test]
    fn apply_par_equals_apply() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let x: Vec<f32> = (0..96 * 400)
            .map(|i| ((i * 37 % 101) as f32) / 25.0 - 2.0)
            .collect();
        let acts = [
            Act::Gelu,
            Act::Tanh,
            Act::Softmax {
                axis_len: 96,
                inner: 1,
            },
            Act::Softmax {
                axis_len: 8,
                inner: 12,
            },
        ];
        for a in acts {
            let (mut want, mut got) = (x.clone(), x.clone());
            a.apply(&mut want);
            pool.install(|| a.apply_par(&mut got, 3));
            assert_eq!(got, want, "{a:?}");
        }
    }

    #[test]
    fn softmax_rows_and_inner() {
        let v = run(
            Act::Softmax {
                axis_len: 3,
                inner: 1,
            },
            &[1.0, 2.0, 3.0, 0.0, 0.0, 0.0],
        );
        let e: Vec<f32> = [1.0f32, 2.0, 3.0].iter().map(|x| (x - 3.0).exp()).collect();
        let s: f32 = e.iter().sum();
        close(&v[..3], &[e[0] / s, e[1] / s, e[2] / s]);
        close(&v[3..], &[1.0 / 3.0; 3]);
        // axis of length 2 with inner 2: pairs (x[0],x[2]) and (x[1],x[3])
        let v = run(
            Act::Softmax {
                axis_len: 2,
                inner: 2,
            },
            &[0.0, 5.0, 0.0, 5.0],
        );
        close(&v, &[0.5, 0.5, 0.5, 0.5]);
        // large values do not overflow
        let v = run(
            Act::Softmax {
                axis_len: 2,
                inner: 1,
            },
            &[1000.0, 1000.0],
        );
        close(&v, &[0.5, 0.5]);
    }
}
