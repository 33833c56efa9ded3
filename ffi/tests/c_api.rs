//! The C ABI as C sees it:
//! 1. `include/palisade.h` is what cbindgen generates from the sources
//!    (`PALISADE_BLESS=1` rewrites it);
//! 2. the header compiles cleanly as C99 and as C++11 with
//!    `-Wall -Wextra -Werror -pedantic`;
//! 3. the C programs in `tests/c/` (every function and error path, threads,
//!    the README example), built with the system compiler against the
//!    static and the shared library, pass;
//! 4. the same programs run clean under valgrind memcheck: no errors, no
//!    definitely, indirectly or possibly lost bytes. Without valgrind this
//!    part is skipped with a notice, unless `PALISADE_REQUIRE_VALGRIND=1`.
//!
//! As root the C programs run in a private network namespace with a veth
//! pair, so the datapath calls attach and detach for real without touching
//! the host's interfaces.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const CRATE_DIR: &str = env!("CARGO_MANIFEST_DIR");
const TEST_IFACE: &str = "palisade0";
const CFLAGS: &[&str] = &["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g"];
/// What a Rust static library needs from the system on Linux (what
/// `rustc --print native-static-libs` reports).
const STATIC_LIBS: &[&str] = &[
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

fn crate_path(p: &str) -> PathBuf {
    Path::new(CRATE_DIR).join(p)
}

fn generate_header() -> String {
    let config = cbindgen::Config::from_file(crate_path("cbindgen.toml"))
        .unwrap_or_else(|e| panic!("reading cbindgen.toml: {e}"));
    let bindings = cbindgen::Builder::new()
        .with_crate(CRATE_DIR)
        .with_config(config)
        .generate()
        .unwrap_or_else(|e| panic!("cbindgen failed: {e}"));
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("cbindgen writes UTF-8")
}

#[test]
fn header_is_current() {
    let generated = generate_header();
    let path = crate_path("include/palisade.h");
    if std::env::var_os("PALISADE_BLESS").is_some_and(|v| v != "0") {
        std::fs::write(&path, &generated).expect("writing include/palisade.h");
        eprintln!("wrote {}", path.display());
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == generated,
        "ffi/include/palisade.h is stale: it differs from what cbindgen generates from ffi/src.\n\
         Regenerate it with:\n    PALISADE_BLESS=1 cargo test -p palisade-ffi --test c_api header_is_current\n\
         and commit the result."
    );
}

/// A scratch directory for this test binary's build products.
fn out_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("palisade-ffi")
        .join(name);
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    dir
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn header_compiles_as_c99_and_cpp11() {
    let dir = out_dir("header");
    let c = dir.join("header.c");
    let cpp = dir.join("header.cpp");
    let tu = "#include \"palisade.h\"\n#include \"palisade.h\"\n\
              int main(void) { palisade_str v = palisade_version(); return v.len == 0; }\n";
    std::fs::write(&c, tu).expect("writing header.c");
    std::fs::write(&cpp, tu.replace("(void)", "()")).expect("writing header.cpp");
    let include = crate_path("include");
    run(Command::new("cc")
        .args(CFLAGS)
        .arg("-I")
        .arg(&include)
        .arg("-fsyntax-only")
        .arg(&c));
    run(Command::new("c++")
        .args(["-std=c++11", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(&include)
        .arg("-fsyntax-only")
        .arg(&cpp));
}

/// The directory with the libraries cargo built for this test run: the
/// test binary's own `deps/` directory (where `cargo test` writes them), or
/// the profile directory above it (where `cargo build` copies them).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("the test binary is in a directory");
    let candidates = [
        deps.to_path_buf(),
        deps.parent().unwrap_or(deps).to_path_buf(),
    ];
    let dir = candidates
        .iter()
        .find(|d| d.join("libpalisade.a").exists() && d.join("libpalisade.so").exists())
        .unwrap_or_else(|| {
            panic!(
                "libpalisade.a and libpalisade.so are in neither {} nor {}: build them with \
                 cargo build -p palisade-ffi",
                candidates[0].display(),
                candidates[1].display()
            )
        })
        .clone();
    // The libraries must be at least as new as the sources they come from.
    let newest_src = std::fs::read_dir(crate_path("src"))
        .expect("reading src/")
        .flatten()
        .filter_map(|e| e.metadata().and_then(|m| m.modified()).ok())
        .max();
    for lib in ["libpalisade.a", "libpalisade.so"] {
        let p = dir.join(lib);
        let built = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
        if let (Some(built), Some(src)) = (built, newest_src) {
            assert!(
                built >= src,
                "{} is older than ffi/src: rebuild with cargo build -p palisade-ffi",
                p.display()
            );
        }
    }
    dir
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Static,
    Shared,
}

/// Compiles every C program once per link mode; returns (name, binary).
fn c_programs(link: Link) -> &'static [(String, PathBuf)] {
    static STATIC: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    static SHARED: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    let cell = match link {
        Link::Static => &STATIC,
        Link::Shared => &SHARED,
    };
    cell.get_or_init(|| {
        let libs = lib_dir();
        let dir = out_dir(match link {
            Link::Static => "static",
            Link::Shared => "shared",
        });
        let mut sources: Vec<PathBuf> = std::fs::read_dir(crate_path("tests/c"))
            .expect("reading tests/c")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "c"))
            .collect();
        sources.sort();
        assert!(!sources.is_empty(), "no C tests in tests/c");
        sources
            .into_iter()
            .map(|src| {
                let name = src
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .expect("UTF-8 file name")
                    .to_string();
                let bin = dir.join(&name);
                let mut cmd = Command::new("cc");
                cmd.args(CFLAGS)
                    .arg("-pthread")
                    .arg("-I")
                    .arg(crate_path("include"))
                    .arg("-o")
                    .arg(&bin)
                    .arg(&src);
                match link {
                    Link::Static => {
                        cmd.arg(libs.join("libpalisade.a")).args(STATIC_LIBS);
                    }
                    Link::Shared => {
                        cmd.arg("-L")
                            .arg(&libs)
                            .arg("-lpalisade")
                            .arg(format!("-Wl,-rpath,{}", libs.display()));
                    }
                }
                run(&mut cmd);
                (name, bin)
            })
            .collect()
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The command running one C program (optionally under a wrapper such as
/// valgrind): as root, inside a fresh network namespace with `lo` up and a
/// veth pair for the datapath calls.
fn program_command(name: &str, bin: &Path, wrapper: &[&str]) -> Command {
    let mut args: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
    args.push(bin.display().to_string());
    let examples = Path::new(CRATE_DIR).join("../examples/zero-trust");
    if name == "readme_example" {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&examples)
            .expect("reading examples/zero-trust")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        args.extend(files.iter().map(|f| f.display().to_string()));
    } else {
        args.push(examples.display().to_string());
    }
    let private_netns = is_root() && have("unshare") && have("ip");
    let mut cmd = if private_netns {
        let mut c = Command::new("unshare");
        c.args(["--net", "--", "sh", "-c"])
            .arg(format!(
                "ip link set lo up || exit 1; \
                 if ip link add {TEST_IFACE} type veth peer name {TEST_IFACE}p && \
                    ip link set {TEST_IFACE} up; then export PALISADE_TEST_IFACE={TEST_IFACE}; fi; \
                 exec \"$@\""
            ))
            .arg("sh")
            .args(&args);
        c.env_remove("PALISADE_TEST_IFACE");
        c
    } else {
        let mut c = Command::new(&args[0]);
        c.args(&args[1..]);
        c.env_remove("PALISADE_TEST_IFACE");
        c
    };
    cmd.env("PALISADE_EXAMPLES", &examples);
    // cargo test points LD_LIBRARY_PATH at target/<profile> too, where an
    // older libpalisade.so from a `cargo build` may be; the rpath set at link
    // time names the right one.
    cmd.env_remove("LD_LIBRARY_PATH");
    cmd
}

fn run_c_tests(link: Link) {
    for (name, bin) in c_programs(link) {
        let out = run(&mut program_command(name, bin, &[]));
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("--- {name} ({link:?})\n{stdout}");
        if name == "readme_example" {
            assert!(
                stdout.contains("allowed by tier default, np:shop-frontend/web-to-api, rule 0"),
                "{stdout}"
            );
        } else {
            assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
        }
    }
}

#[test]
fn c_tests_pass_with_the_static_library() {
    run_c_tests(Link::Static);
}

#[test]
fn c_tests_pass_with_the_shared_library() {
    run_c_tests(Link::Shared);
}

#[test]
fn c_tests_are_clean_under_valgrind() {
    if !have("valgrind") {
        let required = std::env::var("PALISADE_REQUIRE_VALGRIND").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "valgrind is not installed and PALISADE_REQUIRE_VALGRIND=1"
        );
        println!("NOTICE: valgrind is not installed; skipping the memcheck run of the C tests");
        return;
    }
    for (name, bin) in c_programs(Link::Shared) {
        let log = out_dir("valgrind").join(format!("{name}.log"));
        let log_arg = format!("--log-file={}", log.display());
        let supp_arg = format!(
            "--suppressions={}",
            crate_path("tests/valgrind.supp").display()
        );
        let wrapper = [
            "valgrind",
            "--tool=memcheck",
            "--error-exitcode=1",
            "--leak-check=full",
            "--show-leak-kinds=definite,indirect,possible",
            "--errors-for-leak-kinds=definite,indirect,possible",
            "--track-origins=yes",
            log_arg.as_str(),
            supp_arg.as_str(),
        ];
        let out = program_command(name, bin, &wrapper)
            .output()
            .unwrap_or_else(|e| panic!("running valgrind: {e}"));
        let report = std::fs::read_to_string(&log).unwrap_or_default();
        println!("--- valgrind {name}\n{report}");
        assert!(
            out.status.success(),
            "{name} under valgrind failed ({}):\n--- stdout\n{}\n--- stderr\n{}\n--- valgrind\n{report}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            report.contains("ERROR SUMMARY: 0 errors"),
            "{name}: valgrind found errors:\n{report}"
        );
        let leaks_clean = report.contains("All heap blocks were freed")
            || [
                "definitely lost: 0 bytes",
                "indirectly lost: 0 bytes",
                "possibly lost: 0 bytes",
            ]
            .iter()
            .all(|l| report.contains(l));
        assert!(leaks_clean, "{name}: valgrind found leaks:\n{report}");
    }
}

#[test]
fn readme_contains_the_example_verbatim() {
    let readme = std::fs::read_to_string(crate_path("README.md")).expect("reading ffi/README.md");
    let example =
        std::fs::read_to_string(crate_path("tests/c/readme_example.c")).expect("reading example");
    assert!(
        readme.contains(example.trim_end()),
        "ffi/README.md must contain tests/c/readme_example.c verbatim (the test compiles and runs it)"
    );
}
