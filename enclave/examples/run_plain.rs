//! DEV ONLY (not shipped): run an unsealed program directory on a .npy input.
//!
//! `cargo run --release --example run_plain -- PROGRAM_DIR input.npy output.npy [THREADS]`
//! reads PROGRAM_DIR/program.json and PROGRAM_DIR/weights.safetensors, builds the
//! container in memory, runs it and writes the float32 output as .npy (C order).

use ennclave_enclave::exec::Executor;
use ennclave_enclave::program::Program;

fn read_npy(path: &str) -> Result<(Vec<usize>, Vec<f32>), String> {
    let b = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(format!("{path}: not a .npy file"));
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        _ => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
    };
    let header = std::str::from_utf8(b.get(start..start + hlen).ok_or("truncated header")?)
        .map_err(|e| e.to_string())?;
    if !header.contains("'descr': '<f4'") {
        return Err(format!(
            "{path}: dtype must be little-endian float32 ({header})"
        ));
    }
    if header.contains("'fortran_order': True") {
        return Err(format!("{path}: must be C order"));
    }
    let sh = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or("no shape")?;
    let shape: Vec<usize> = sh
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| format!("bad shape {sh}")))
        .collect::<Result<_, _>>()?;
    let data: Vec<f32> = b[start + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if data.len() != shape.iter().product::<usize>() {
        return Err(format!(
            "{path}: data length does not match shape {shape:?}"
        ));
    }
    Ok((shape, data))
}

fn write_npy(path: &str, shape: &[usize], data: &[f32]) -> std::io::Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_s}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out)
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: run_plain PROGRAM_DIR input.npy output.npy [THREADS]".into());
    }
    let threads = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(0);
    let json = std::fs::read(format!("{}/program.json", args[1])).map_err(|e| e.to_string())?;
    let weights =
        std::fs::read(format!("{}/weights.safetensors", args[1])).map_err(|e| e.to_string())?;
    let mut c = b"ENCPROG1".to_vec();
    c.extend_from_slice(&(json.len() as u64).to_le_bytes());
    c.extend_from_slice(&json);
    c.extend_from_slice(&weights);
    let p = Program::from_container(&c).map_err(|e| e.to_string())?;
    let (shape, x) = read_npy(&args[2])?;
    let batch = *shape.first().ok_or("input must have a batch dimension")?;
    let mut ex = Executor::new(&p, batch.max(1), threads).map_err(|e| e.to_string())?;
    if shape[1..] != *ex.input_shape() {
        return Err(format!(
            "input shape {:?} does not match the program's [N, {:?}]",
            shape,
            ex.input_shape()
        ));
    }
    let mut y = vec![0.0f32; batch * ex.output_len_per_sample()];
    ex.run(&x, batch, &mut y).map_err(|e| e.to_string())?;
    let mut oshape = vec![batch];
    oshape.extend_from_slice(ex.output_shape());
    write_npy(&args[3], &oshape, &y).map_err(|e| e.to_string())?;
    eprintln!(
        "ok: {:?} -> {:?} (weights in {})",
        shape,
        oshape,
        p.weights_backing().as_str()
    );
    Ok(())
}
