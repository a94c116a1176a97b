//! The shape guests build and run correctly in mode `off` on KVM (what every other
//! mode and backend is compared against; see tests/support/shapes.rs).

mod support;

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(not(avex_kvm), ignore = "needs /dev/kvm")]
fn every_shape_builds_and_ends_with_status_0_in_mode_off() {
    let names = support::shapes::all();
    assert!(!names.is_empty(), "no shape guests in tests/shapes");
    for name in names {
        let elf = support::shapes::build(&name);
        let out = support::avex()
            .args(["run", "--mode", "off"])
            .arg(&elf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "shape {name} in mode off: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stdout.is_empty(), "shape {name} printed nothing");
    }
}
