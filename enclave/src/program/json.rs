//! Checked accessors for the program's JSON: each names what it read in its error
//! and caps sizes (`MAX_DIM`, `MAX_SAMPLE_ELEMS`).

use serde_json::{Map, Value};

use super::{fail, Error, MAX_DIM, MAX_SAMPLE_ELEMS};

pub(super) fn obj<'a>(v: &'a Value, what: &str) -> Result<&'a Map<String, Value>, Error> {
    v.as_object()
        .ok_or_else(|| Error(format!("{what} must be a JSON object")))
}

pub(super) fn string<'a>(v: &'a Value, what: &str) -> Result<&'a str, Error> {
    v.as_str()
        .ok_or_else(|| Error(format!("{what} must be a string")))
}

pub(super) fn uint(v: &Value, what: &str) -> Result<usize, Error> {
    match v.as_u64() {
        Some(x) if x <= MAX_DIM as u64 => Ok(x as usize),
        Some(_) => fail(format!("{what} is too large")),
        None => fail(format!("{what} must be a non-negative integer")),
    }
}

pub(super) fn pos(v: &Value, what: &str) -> Result<usize, Error> {
    match uint(v, what)? {
        0 => fail(format!("{what} must be positive")),
        x => Ok(x),
    }
}

pub(super) fn int(v: &Value, what: &str) -> Result<i64, Error> {
    v.as_i64()
        .filter(|x| x.unsigned_abs() <= MAX_DIM as u64)
        .ok_or_else(|| Error(format!("{what} must be an integer")))
}

pub(super) fn float(v: &Value, what: &str) -> Result<f32, Error> {
    v.as_f64()
        .map(|x| x as f32)
        .ok_or_else(|| Error(format!("{what} must be a number")))
}

pub(super) fn boolean(v: &Value, what: &str) -> Result<bool, Error> {
    v.as_bool()
        .ok_or_else(|| Error(format!("{what} must be true or false")))
}

pub(super) fn list<'a>(v: &'a Value, what: &str) -> Result<&'a Vec<Value>, Error> {
    v.as_array()
        .ok_or_else(|| Error(format!("{what} must be a list")))
}

pub(super) fn list_n<'a>(v: &'a Value, n: usize, what: &str) -> Result<&'a Vec<Value>, Error> {
    let l = list(v, what)?;
    if l.len() != n {
        return fail(format!("{what} must have {n} entries, not {}", l.len()));
    }
    Ok(l)
}

pub(super) fn checked_product(dims: &[usize], what: &str) -> Result<usize, Error> {
    let mut p = 1usize;
    for &d in dims {
        p = p
            .checked_mul(d)
            .filter(|&p| p <= MAX_SAMPLE_ELEMS)
            .ok_or_else(|| Error(format!("{what}: tensor of shape {dims:?} is too large")))?;
    }
    Ok(p)
}

/// Resolve an axis of a tensor of full rank `rank` (batch included) to 0..rank.
pub(super) fn axis(v: &Value, rank: usize, what: &str) -> Result<usize, Error> {
    let a = int(v, what)?;
    let r = rank as i64;
    let a2 = if a < 0 { a + r } else { a };
    if a2 < 0 || a2 >= r {
        return fail(format!("{what} {a} is out of range for rank {rank}"));
    }
    Ok(a2 as usize)
}
