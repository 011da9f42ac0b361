//! Scripts and bridge helpers run without a shell, by absolute path.

use std::{os::unix::fs::PermissionsExt, path::Path};

use super::{PortError, run_bridge_helper, run_script};

/// A stand-in program that writes its arguments, one per line, to `out`, then fails.
fn recorder(dir: &Path, out: &Path) -> String {
    let program = dir.join("record");
    std::fs::write(&program, format!("#!/bin/sh\nprintf '%s\\n' \"$@\" > '{}'\nexit 1\n", out.display()))
        .expect("write recorder");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    program.display().to_string()
}

#[test]
fn helper_words_and_bridge_reach_no_shell() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("args");
    let witness = dir.path().join("pwned");
    let helper = format!("{} --x;touch {}", recorder(dir.path(), &out), witness.display());
    let bridge = format!("br0;touch {}", witness.display());
    let error = run_bridge_helper("h0", &helper, &bridge).expect_err("the recorder sends no fd");
    assert!(matches!(error, PortError::Helper { .. }), "{error}");
    let args = std::fs::read_to_string(&out).expect("the helper ran");
    let args: Vec<&str> = args.lines().collect();
    // Split at whitespace only: `;` stays inside the words, and QEMU's arguments come last.
    assert_eq!(args.len(), 5, "{args:?}");
    assert_eq!(args[0], "--x;touch");
    assert_eq!(args[1], witness.display().to_string());
    assert_eq!(args[2], "--use-vnet");
    assert!(args[3].starts_with("--fd="), "{args:?}");
    assert_eq!(args[4], format!("--br={bridge}"));
    assert!(!witness.exists(), "a shell ran the helper string");
}

#[tokio::test]
async fn programs_must_be_absolute_paths() {
    let error = run_bridge_helper("h0", "qemu-bridge-helper", "br0").unwrap_err();
    assert_eq!(
        error.to_string(),
        "helper 'qemu-bridge-helper' must be an absolute path: netdevd runs programs without a shell or PATH search"
    );
    let error = run_script("t0", "true", "tap0").await.unwrap_err();
    assert!(matches!(error, PortError::NotAbsolute { what: "script", .. }), "{error}");
    let error = run_script("t0", "/bin/true --x", "tap0").await.unwrap_err();
    assert_eq!(error.to_string(), "network script /bin/true --x failed with status 256", "no splitting for scripts, as QEMU");
    run_script("t0", "/bin/true", "tap0").await.expect("an absolute script runs");
}
