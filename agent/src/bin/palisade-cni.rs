//! `palisade-cni`: the CNI plugin container runtimes exec. Thin: the
//! node agent does the work (see `palisade_cni`).

fn main() -> std::process::ExitCode {
    palisade_cni::plugin::run()
}
