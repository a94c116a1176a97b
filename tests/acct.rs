//! Exit accounting that is true on each backend: an instruction run inside a
//! cluster counts as an avoided exit only if it would have exited on the backend
//! that ran it. On KVM here CPUID and RDTSC never reach avex (KVM runs them in the
//! kernel), so a loop of `out; cpuid; rdtsc; in` avoids at most the OUT and the IN
//! of each round: a clustered run's exit-prone executions are the exits mode `off`
//! takes, not twice as many. Under VT-x all four exit, and all four count.

mod support;

use std::path::Path;

/// Rounds of the shape's loop (tests/shapes/acct_out_cpuid_rdtsc_in.c).
const ROUNDS: u64 = 200;

fn run_json(elf: &Path, mode: &str, dir: &Path) -> (serde_json::Value, Vec<u8>) {
    run_on("kvm", elf, mode, dir)
}

fn run_on(backend: &str, elf: &Path, mode: &str, dir: &Path) -> (serde_json::Value, Vec<u8>) {
    let json = dir.join(format!("{backend}-{}.json", mode.replace('+', "_")));
    let out = support::avex()
        .args(["run", "--backend", backend, "--mode", mode, "--json"])
        .arg(&json)
        .arg(elf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mode {mode}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (v, out.stdout)
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(not(avex_kvm), ignore = "needs /dev/kvm")]
fn kvm_counts_only_what_exits_on_kvm_as_avoided() {
    let dir = tempfile::tempdir().unwrap();
    let plain = support::shapes::build("acct_out_cpuid_rdtsc_in");
    // A pre-analyzed image, for the aot modes.
    let image = dir.path().join("shape.pre.elf");
    let st = support::avex()
        .arg("link")
        .arg(&plain)
        .arg("-o")
        .arg(&image)
        .status()
        .unwrap();
    assert!(st.success(), "avex link");

    let (off, off_console) = run_json(&plain, "off", dir.path());
    let exits_off = num(&off, "exits");
    // The OUT and the IN of every round reach avex; CPUID and RDTSC do not.
    assert!(exits_off >= 2 * ROUNDS, "off: {off}");
    let by_reason = &off["exits_by_reason"];
    assert!(by_reason.get("cpuid").is_none(), "off: {by_reason}");
    assert!(
        off["exits_counted"].as_str().unwrap().contains("KVM"),
        "{off}"
    );
    assert!(
        !off["exit_set"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "CPUID" || c == "RDTSC"),
        "KVM's exit set: {}",
        off["exit_set"]
    );

    for (mode, elf) in [("dynamic", &plain), ("aot+dynamic", &image)] {
        let (r, console) = run_json(elf, mode, dir.path());
        assert_eq!(console, off_console, "{mode}: console differs from off");
        let exits = num(&r, "exits");
        let prone = num(&r, "exit_prone");
        let avoided = num(&r, "avoided");
        assert!(exits < exits_off / 4, "{mode}: clusters ran: {r}");
        // What was avoided is at most what off took and this mode did not (a few
        // exits of slack: KVM's count includes host interrupts).
        assert!(
            avoided <= exits_off - exits + 16,
            "{mode}: {avoided} avoided, but off took {exits_off} exits and this mode {exits}"
        );
        assert!(
            prone <= exits_off + 16,
            "{mode}: exit-prone {prone}, off took {exits_off} exits"
        );
        // The CPUIDs and RDTSCs ran in clusters, counted apart.
        let apart = &r["in_cluster_not_exiting_by_class"];
        for class in ["CPUID", "RDTSC"] {
            let n = apart[class].as_u64().unwrap_or(0);
            assert!(
                (ROUNDS - 10..=ROUNDS).contains(&n),
                "{mode}: {class} {n}: {r}"
            );
        }
        assert!(r["in_cluster_exiting_by_class"].get("CPUID").is_none());
        assert_eq!(
            num(&r, "in_cluster_not_exiting"),
            apart
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum::<u64>()
        );
    }
}

#[test]
#[cfg_attr(not(avex_gcc), ignore = "needs gcc")]
#[cfg_attr(not(avex_bochs), ignore = "needs Bochs")]
fn vtx_counts_cpuid_and_rdtsc_in_clusters_as_avoided() {
    let dir = tempfile::tempdir().unwrap();
    let elf = support::shapes::build("acct_out_cpuid_rdtsc_in");
    let (off, off_console) = run_on("bochs", &elf, "off", dir.path());
    let exits_off = num(&off, "exits");
    // All four instructions of every round exit under VT-x.
    assert!(exits_off >= 4 * ROUNDS, "off: {off}");
    assert!(off["exits_by_reason"]["cpuid"].as_u64() >= Some(ROUNDS));
    let (r, console) = run_on("bochs", &elf, "dynamic", dir.path());
    assert_eq!(console, off_console, "dynamic: console differs from off");
    let exits = num(&r, "exits");
    assert!(exits < exits_off / 4, "clusters ran: {r}");
    assert_eq!(num(&r, "exit_prone"), exits_off, "{r}");
    assert_eq!(num(&r, "in_cluster_not_exiting"), 0, "{r}");
    for class in ["CPUID", "RDTSC"] {
        let n = r["in_cluster_exiting_by_class"][class]
            .as_u64()
            .unwrap_or(0);
        assert!((ROUNDS - 10..=ROUNDS).contains(&n), "{class} {n}: {r}");
    }
}
