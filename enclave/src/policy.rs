//! The bundle's output policy (manifest `output_policy`): what of each output sample
//! leaves the worker (everything, the top k, the label or rounded values) and the
//! bundle's query budget.

use serde_json::Value;

/// What of an output sample is released.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// The raw output.
    Full,
    /// The k largest values' indices, then the values.
    TopK(usize),
    /// The index of the largest value.
    Label,
    /// Every value rounded to this many decimals.
    Round(i32),
}

/// The output mode and the bundle's query budget (samples), if any.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub mode: Mode,
    pub max_queries: Option<u64>,
}

impl Policy {
    /// Read `output_policy` from the manifest; `out_len` is the values per sample.
    pub fn from_manifest(m: &Value, out_len: usize) -> Result<Policy, String> {
        let p = match m.get("output_policy") {
            None | Some(Value::Null) => {
                return Ok(Policy {
                    mode: Mode::Full,
                    max_queries: None,
                })
            }
            Some(p) if p.is_object() => p,
            Some(_) => return Err("output_policy is not an object".into()),
        };
        let int = |key: &str| -> Result<Option<u64>, String> {
            match p.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| format!("output_policy.{key} must be a non-negative integer")),
            }
        };
        let mode = match p.get("mode").and_then(Value::as_str).unwrap_or("full") {
            "full" => Mode::Full,
            "top_k" => {
                let k = int("k")?.ok_or("output_policy mode top_k needs an integer k")? as usize;
                if k == 0 || k > out_len {
                    return Err(format!("output_policy.k = {k} is outside 1..={out_len}"));
                }
                Mode::TopK(k)
            }
            "label" => Mode::Label,
            "round" => {
                let d = int("decimals")?.unwrap_or(2);
                if d > 8 {
                    return Err(format!("output_policy.decimals = {d} is outside 0..=8"));
                }
                Mode::Round(d as i32)
            }
            other => return Err(format!("unknown output_policy mode {other:?}")),
        };
        Ok(Policy {
            mode,
            max_queries: int("max_queries")?,
        })
    }

    /// Values per output sample after the policy, from `full` raw values.
    pub fn out_len(&self, full: usize) -> usize {
        match self.mode {
            Mode::Full | Mode::Round(_) => full,
            Mode::TopK(k) => 2 * k,
            Mode::Label => 1,
        }
    }

    /// The policy as READY reports it (`top_k:3;max_queries:100`).
    pub fn describe(&self) -> String {
        let mut s = match self.mode {
            Mode::Full => "full".to_string(),
            Mode::TopK(k) => format!("top_k:{k}"),
            Mode::Label => "label".to_string(),
            Mode::Round(d) => format!("round:{d}"),
        };
        if let Some(q) = self.max_queries {
            s.push_str(&format!(";max_queries:{q}"));
        }
        s
    }

    /// Apply to one sample: `full` is the raw output, `out` gets `out_len(full.len())`.
    pub fn apply(&self, full: &[f32], out: &mut [f32], order: &mut Vec<usize>) {
        match self.mode {
            Mode::Full => out.copy_from_slice(full),
            Mode::Round(d) => {
                let s = 10f64.powi(d);
                for (o, &x) in out.iter_mut().zip(full) {
                    *o = ((x as f64 * s).round() / s) as f32;
                }
            }
            Mode::Label => out[0] = argmax(full) as f32,
            Mode::TopK(k) => {
                order.clear();
                order.extend(0..full.len());
                // Descending by value, NaN last, ties by lower index (stable sort).
                order.sort_by(|&a, &b| key(full[b]).total_cmp(&key(full[a])));
                for i in 0..k {
                    out[i] = order[i] as f32;
                    out[k + i] = full[order[i]];
                }
            }
        }
    }
}

/// Sort key: NaN below everything.
fn key(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

/// Index of the largest value (NaN last, ties to the lower index).
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if key(x) > key(v[best]) {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pol(j: &str, n: usize) -> Result<Policy, String> {
        Policy::from_manifest(&serde_json::from_str(j).unwrap(), n)
    }

    #[test]
    fn policies() {
        let full = [0.1f32, 0.7, 0.2, 0.7];
        let mut order = vec![];
        let p = pol(
            r#"{"output_policy":{"mode":"top_k","k":2,"max_queries":5}}"#,
            4,
        )
        .unwrap();
        assert_eq!(p.max_queries, Some(5));
        let mut out = [0f32; 4];
        p.apply(&full, &mut out, &mut order);
        assert_eq!(out, [1.0, 3.0, 0.7, 0.7]);
        let p = pol(r#"{"output_policy":{"mode":"label"}}"#, 4).unwrap();
        let mut out = [0f32; 1];
        p.apply(&full, &mut out, &mut order);
        assert_eq!(out, [1.0]);
        let p = pol(r#"{"output_policy":{"mode":"round","decimals":0}}"#, 4).unwrap();
        let mut out = [0f32; 4];
        p.apply(&[0.4, 0.6, -1.5, 2.49], &mut out, &mut order);
        assert_eq!(out, [0.0, 1.0, -2.0, 2.0]);
        assert!(pol(r#"{}"#, 4).unwrap().mode == Mode::Full);
        assert!(pol(r#"{"output_policy":{"mode":"top_k","k":5}}"#, 4).is_err());
        assert!(pol(r#"{"output_policy":{"mode":"nope"}}"#, 4).is_err());
        assert!(pol(r#"{"output_policy":{"mode":"full","max_queries":-1}}"#, 4).is_err());
    }

    #[test]
    fn argmax_nan_last() {
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, 3.0]), 2);
    }
}
