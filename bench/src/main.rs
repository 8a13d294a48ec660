//! sluice-bench: the benchmark harness (filled by the engine, node and
//! replicator issues).
fn main() {
    eprintln!("sluice-bench: no benchmark implemented yet");
    std::process::exit(2);
}
