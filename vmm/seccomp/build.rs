//! Compiles `filters.json` (seccompiler's JSON) to BPF, once as written (a forbidden call traps)
//! and once with every trap turned into a log (`EMBER_SECCOMP=log`), into `$OUT_DIR/NAME.bpf` and
//! `$OUT_DIR/NAME.log.bpf`: each instruction as its 8 bytes (code, jt, jf, k; little-endian).

use std::path::Path;

use seccompiler::{BpfProgram, TargetArch};

fn compile(json: &serde_json::Value, out: &Path, suffix: &str) {
    let filters = seccompiler::compile_from_json(json.to_string().as_bytes(), TargetArch::x86_64)
        .unwrap_or_else(|e| panic!("filters.json does not compile: {e}"));
    for (name, program) in filters {
        std::fs::write(out.join(format!("{name}{suffix}.bpf")), encode(&program)).expect("write a compiled filter");
    }
}

fn encode(program: &BpfProgram) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(program.len() * 8);
    for insn in program {
        bytes.extend_from_slice(&insn.code.to_le_bytes());
        bytes.extend_from_slice(&[insn.jt, insn.jf]);
        bytes.extend_from_slice(&insn.k.to_le_bytes());
    }
    bytes
}

fn main() {
    println!("cargo:rerun-if-changed=filters.json");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    assert_eq!(arch, "x86_64", "ember's seccomp filters are written for x86_64 system calls only, not {arch}");
    let out = std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR");
    let out = Path::new(&out);
    let text = std::fs::read_to_string("filters.json").expect("read filters.json");
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("filters.json is JSON");
    compile(&json, out, "");
    for filter in json.as_object_mut().expect("filters.json maps names to filters").values_mut() {
        if filter["mismatch_action"] == "trap" {
            filter["mismatch_action"] = "log".into();
        }
    }
    compile(&json, out, ".log");
}
