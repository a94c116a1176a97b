//! `avex compare` end to end on the KVM backend: every mode of each guest, the
//! table, the JSON list and the SVG chart; a guest whose console output differs
//! between modes makes the command fail.
//!
//! Needs /dev/kvm; says why it skips when it is unavailable.

use std::process::Command;

const MODES: [&str; 4] = ["off", "dynamic", "aot", "aot+dynamic"];

#[test]
#[cfg_attr(not(avex_kvm), ignore = "needs /dev/kvm")]
fn compare_runs_every_mode_and_writes_table_json_and_chart() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("cmp.json");
    let chart = dir.path().join("cmp.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_avex"))
        .args(["compare", "rtc", "pci", "--backend", "kvm", "--json"])
        .arg(&json)
        .arg("--chart")
        .arg(&chart)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Table: a header and one row per guest and mode.
    assert!(stdout.lines().next().unwrap().contains("exits"));
    for g in ["rtc", "pci"] {
        for m in MODES {
            assert!(
                stdout
                    .lines()
                    .any(|l| l.split_whitespace().take(2).eq([g, m])),
                "no row for {g} {m}:\n{stdout}"
            );
        }
        assert!(
            stdout.contains(&format!("{g}: exits off ")),
            "no summary line for {g}"
        );
    }
    // Exits by reason, and the time apart (KVM_RUN, user space), never a ratio
    // presented as the benefit of avoided exits.
    assert!(stdout.contains("exits by reason"), "{stdout}");
    assert!(stdout.contains("KVM_RUN ms") && stdout.contains("user space ms"));
    assert!(!stdout.contains("faster"), "{stdout}");
    assert!(stdout.contains("PROJECTED on VT-x hardware (a cost model, not a measurement)"));
    assert!(
        stdout.contains("exits on kvm: KVM's `exits` statistic"),
        "{stdout}"
    );

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let records = v.as_array().expect("a JSON list");
    assert_eq!(records.len(), 8);
    for r in records {
        for key in [
            "guest",
            "mode",
            "backend",
            "exits",
            "exit_prone",
            "avoided",
            "translations_built",
            "console_sha256",
            "seconds",
            "exits_counted",
            "exits_by_reason",
            "exit_set",
            "in_cluster_exiting_by_class",
            "in_cluster_not_exiting_by_class",
        ] {
            assert!(r.get(key).is_some(), "record lacks {key}: {r}");
        }
        // The exit handler's statistics are in the record whole, under their names.
        let stats: avex_core::stats::ExitStats = serde_json::from_value(r.clone()).unwrap();
        for key in serde_json::to_value(&stats)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
        {
            assert!(
                r.get(key).is_some(),
                "record lacks the statistic {key}: {r}"
            );
        }
        assert_eq!(r["same_output_as_off"], true, "{r}");
        assert_eq!(r["backend"], "kvm");
        // The exit distance (KVM: from insn_emulation, always on in compare): one
        // gap per exit after the first that reached the exit handler.
        let d = &r["exit_distance"];
        assert_eq!(d["source"], "kvm_insn_emulation", "{r}");
        let buckets: Vec<u64> = serde_json::from_value(d["log2_buckets"].clone()).unwrap();
        assert_eq!(buckets.iter().sum::<u64>(), d["gaps"].as_u64().unwrap());
        assert_eq!(
            d["gaps"].as_u64().unwrap(),
            r["handled_exits"].as_u64().unwrap() - 1,
            "{r}"
        );
        assert_eq!(d["clamped"], 0, "{r}");
        assert_eq!(r["cost_model"]["kind"], "projection", "{r}");
        assert!(r["cost_model"]["speedup_vs_off"].is_number(), "{r}");
        let t = &r["time_split"];
        for key in ["kvm_run_ms", "user_space_ms", "kvm_emulated_insns"] {
            assert!(t[key].is_number(), "time_split lacks {key}: {r}");
        }
    }
    let rec = |g: &str, m: &str| {
        records
            .iter()
            .find(|r| r["guest"] == g && r["mode"] == m)
            .unwrap_or_else(|| panic!("no record {g} {m}"))
    };
    for g in ["rtc", "pci"] {
        let off = rec(g, "off");
        let both = rec(g, "aot+dynamic");
        assert!(
            both["exits"].as_u64() < off["exits"].as_u64(),
            "{g}: aot+dynamic {} vs off {}",
            both["exits"],
            off["exits"]
        );
        assert_eq!(rec(g, "aot")["translations_built"], 0);
        assert!(rec(g, "dynamic")["translations_built"].as_u64().unwrap() > 0);
        let sha = off["console_sha256"].clone();
        for m in MODES {
            assert_eq!(rec(g, m)["console_sha256"], sha, "{g} {m}");
        }
    }

    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"));
    // Every run's exits and distance buckets are named in the chart's description,
    // and each guest has its distance panel.
    for g in ["rtc", "pci"] {
        for m in MODES {
            let r = rec(g, m);
            let buckets: Vec<u64> =
                serde_json::from_value(r["exit_distance"]["log2_buckets"].clone()).unwrap();
            let line = format!(
                "{g} {m}: {} exits; gaps by log2 bucket {buckets:?}",
                r["exits"]
            );
            assert!(svg.contains(&line), "no {line:?} in the chart");
        }
        assert!(svg.contains(&format!("{g}: guest instructions between exits")));
    }
}

#[test]
fn compare_rejects_a_guest_it_cannot_find() {
    let out = Command::new(env!("CARGO_BIN_EXE_avex"))
        .args(["compare", "no-such-guest"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-guest"));
}
