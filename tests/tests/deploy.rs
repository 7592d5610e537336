//! The examples in deploy/ stay valid: YAML parses, probes and metrics ports match what
//! the agent serves, the embedded TOML is a config `run` accepts, and systemd units use
//! only known sections and keys.

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn docs(name: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(deploy().join("kubernetes").join(name)).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn containers(doc: &Yaml) -> Vec<Yaml> {
    let spec = &doc["spec"]["template"]["spec"];
    let spec = if spec.is_badvalue() {
        &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    } else {
        spec
    };
    spec["containers"].as_vec().cloned().unwrap_or_default()
}

#[test]
fn kubernetes_sidecar_example() {
    let d = docs("postgres-with-walferry.yaml");
    assert_eq!(d.len(), 2);
    assert_eq!(d[0]["kind"].as_str(), Some("ConfigMap"));
    assert_eq!(d[1]["kind"].as_str(), Some("StatefulSet"));
    // The embedded settings are a config file `run` accepts (unknown keys would fail).
    let toml_text = d[0]["data"]["walferry.toml"].as_str().unwrap();
    let settings: walferry_agent::daemon::FileSettings = toml::from_str(toml_text).unwrap();
    assert_eq!(settings.listen.as_deref(), Some("0.0.0.0:9187"));
    walferry_agent::daemon::Schedule::parse_cron(settings.backup_cron.as_deref().unwrap()).unwrap();
    let c = containers(&d[1]);
    let side = c
        .iter()
        .find(|c| c["name"].as_str() == Some("walferry"))
        .expect("walferry container");
    assert_eq!(
        side["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/health/live")
    );
    assert_eq!(
        side["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/health/ready")
    );
    assert_eq!(side["ports"][0]["containerPort"].as_i64(), Some(9187));
    let args: Vec<String> = side["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(&args[..2], ["walferry-agent", "run"]);
    let (st, help, _) =
        walferry_tests::bins::run_walferry("walferry-agent", &["run".into(), "--help".into()], &[])
            .unwrap();
    assert!(st.success());
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag.as_str()), "run --help lacks {flag}");
    }
}

#[test]
fn kubernetes_verify_cronjob() {
    let d = docs("verify-cronjob.yaml");
    assert_eq!(d[0]["kind"].as_str(), Some("CronJob"));
    let c = containers(&d[0]);
    let args: Vec<String> = c[0]["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(&args[..2], ["walferry-restore", "verify"]);
    let (st, help, _) = walferry_tests::bins::run_walferry(
        "walferry-restore",
        &["verify".into(), "--help".into()],
        &[],
    )
    .unwrap();
    assert!(st.success());
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag.as_str()), "verify --help lacks {flag}");
    }
}

/// Sections and keys systemd knows, for the directives these units use.
const KNOWN: &[(&str, &[&str])] = &[
    (
        "Unit",
        &[
            "Description",
            "Documentation",
            "After",
            "Before",
            "Wants",
            "Requires",
            "BindsTo",
            "PartOf",
        ],
    ),
    (
        "Service",
        &[
            "Type",
            "User",
            "Group",
            "Environment",
            "EnvironmentFile",
            "ExecStart",
            "ExecStartPre",
            "ExecStop",
            "KillSignal",
            "TimeoutStopSec",
            "Restart",
            "RestartSec",
            "NoNewPrivileges",
            "ProtectSystem",
            "ProtectHome",
            "PrivateTmp",
            "ReadWritePaths",
            "MemoryMax",
        ],
    ),
    (
        "Timer",
        &[
            "OnCalendar",
            "RandomizedDelaySec",
            "Persistent",
            "OnBootSec",
            "Unit",
        ],
    ),
    ("Install", &["WantedBy", "RequiredBy", "Alias"]),
];

#[test]
fn systemd_units_use_known_keys() {
    let dir = deploy().join("systemd");
    let mut checked = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut section: Option<&(&str, &[&str])> = None;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = Some(
                    KNOWN
                        .iter()
                        .find(|(s, _)| *s == name)
                        .unwrap_or_else(|| panic!("{}: unknown section [{name}]", path.display())),
                );
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: not a key=value line: {line:?}", path.display()));
            let (sname, keys) =
                section.unwrap_or_else(|| panic!("{}: key outside a section", path.display()));
            assert!(
                keys.contains(&key.trim()),
                "{}: unknown key {key} in [{sname}]",
                path.display()
            );
            assert!(!value.trim().is_empty(), "{}: empty {key}", path.display());
        }
        checked += 1;
        // systemd's own checker, where the machine has it: only a missing binary is acceptable.
        if let Ok(out) = std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
        {
            let err = String::from_utf8_lossy(&out.stderr);
            for l in err.lines() {
                let harmless = l.contains("is not executable")
                    || l.contains("No such file")
                    || l.contains("Failed to prepare")
                    || l.contains("Unit ") && l.contains("not found");
                assert!(harmless, "{}: systemd-analyze: {l}", path.display());
            }
        }
    }
    assert!(checked >= 3);
}
