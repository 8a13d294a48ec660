//! The `sluice` binary.
fn main() {
    eprintln!("sluice: not implemented yet");
    std::process::exit(2);
}
