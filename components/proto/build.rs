//! Generates the prost messages and tonic services of `proto/`.
//! `bytes(".")` makes every `bytes` field a `bytes::Bytes`, so keys and
//! values move from the socket to RocksDB without copies.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "metapb.proto",
        "errorpb.proto",
        "kvpb.proto",
        "adminpb.proto",
        "raftpb.proto",
        "raftcmdpb.proto",
        "localpb.proto",
        "etcdkvpb.proto",
    ];
    let paths: Vec<String> = files.iter().map(|f| format!("../../proto/{f}")).collect();
    for p in &paths {
        println!("cargo:rerun-if-changed={p}");
    }
    // BTreeMap: maps encode in key order, so equal records encode to equal
    // bytes (the meta shard compares and swaps encoded records).
    tonic_prost_build::configure()
        .bytes(".")
        .btree_map(".")
        .compile_protos(&paths, &["../../proto".to_string()])?;
    Ok(())
}
