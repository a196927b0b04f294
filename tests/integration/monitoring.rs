//! The monitoring artefacts under `deploy/` against the real daemons and the
//! real `promtool`: the alerting rules pass `promtool check rules` and their
//! unit tests, and every metric that a rule or a dashboard panel names exists
//! in the `/metrics` scrapes of a running rotator and agent.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fernetd::config::{
    AdminConfig, AgentConfig, AgentEndpoint, AgentRepository, FanoutConfig, PolicyConfig,
    RepositoryConfig, RotatorConfig, ScheduleConfig,
};

use crate::common::daemon::{Daemon, free_addr, poll_until};
use crate::common::pki::{Ca, Leaf, TlsFiles, client_tls, write_file};

const ROTATOR_ID: &str = "rotator.fernetd.test";
const ADMIN_ID: &str = "admin.fernetd.test";
const AGENT_ID: &str = "regionone.agents.fernetd.test";

/// Metrics a rotator exports only under `[ha]`: the rules and the dashboard
/// may name them; `ha::` checks that an HA rotator exports each one.
pub const HA_ONLY: [&str; 2] = [
    "fernetd_rotator_ha_leader",
    "fernetd_rotator_ha_etcd_reachable",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn promtool(args: &[&str]) -> String {
    crate::common::debian::ensure_tool("promtool", "prometheus");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(root().join("deploy/prometheus"))
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let check = promtool(&["check", "rules", "fernetd-rules.yml"]);
    let rules = alert_exprs(&read("deploy/prometheus/fernetd-rules.yml")).len();
    assert!(
        check.contains(&format!("SUCCESS: {rules} rules found")),
        "{check}"
    );
    let tests = promtool(&["test", "rules", "fernetd-rules.test.yml"]);
    assert!(tests.contains("SUCCESS"), "{tests}");
    // Every alert has at least one unit test that expects it to fire.
    let test_file = read("deploy/prometheus/fernetd-rules.test.yml");
    for name in alert_names(&read("deploy/prometheus/fernetd-rules.yml")) {
        assert!(
            test_file.contains(&format!(
                "alertname: {name}\n        exp_alerts:\n          - exp_labels"
            )),
            "no unit test expects {name} to fire"
        );
    }
}

// ---------------------------------------------------------------- metric names

/// The `alert:` names in a rules file.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

/// Every `expr:` of a rules file, single-line or a block scalar (`|`, `>`),
/// one per rule: the count is checked against the `- alert:` lines so no rule
/// escapes the metric check by being written in an unexpected way.
fn alert_exprs(rules: &str) -> Vec<String> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest == "|" || rest == ">" {
            let indent = line.len() - line.trim_start().len();
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            exprs.push(block.join(" "));
        } else {
            exprs.push(rest.to_string());
        }
    }
    assert_eq!(
        exprs.len(),
        alert_names(rules).len(),
        "every alert rule has exactly one expr"
    );
    exprs
}

/// Every `expr` in the dashboard's panel targets.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or("?");
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title} has no targets"));
        assert!(!targets.is_empty(), "panel {title} has no targets");
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("a target of panel {title} has no expr"));
            out.push(expr.to_string());
        }
    }
    out
}

/// The `fernetd_*` metric names a PromQL expression uses. Label names and
/// values never start with `fernetd_` in these files, and strings are skipped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = expr.char_indices().peekable();
    let mut in_string = false;
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            in_string = !in_string;
            continue;
        }
        if in_string || !(c.is_ascii_alphabetic() || c == '_') {
            continue;
        }
        let mut end = i + c.len_utf8();
        while let Some(&(j, d)) = chars.peek() {
            if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                end = j + d.len_utf8();
                chars.next();
            } else {
                break;
            }
        }
        let word = &expr[i..end];
        if word.starts_with("fernetd_") {
            names.insert(word.to_string());
        }
    }
    names
}

/// The series names a text exposition offers: every sample's name, and for
/// each `# TYPE` the names its samples take (a family may have no sample yet,
/// like refusals before the first refusal).
fn exposed_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

#[test]
fn the_name_extraction_finds_names_and_ignores_labels_and_strings() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(fernetd_agent_x_bucket{job=~"fernetd_y"}[5m]))) - fernetd_rotator_z"#
        ),
        BTreeSet::from(["fernetd_agent_x_bucket".into(), "fernetd_rotator_z".into()])
    );
    let scrape = "# TYPE fernetd_agent_refusals counter\n# TYPE fernetd_agent_d histogram\nfernetd_agent_g{repository=\"t\"} 1\n# EOF\n";
    assert_eq!(
        exposed_names(scrape),
        BTreeSet::from([
            "fernetd_agent_refusals_total".into(),
            "fernetd_agent_d_bucket".into(),
            "fernetd_agent_d_sum".into(),
            "fernetd_agent_d_count".into(),
            "fernetd_agent_g".into(),
        ])
    );
}

/// `GET /metrics` over plain HTTP/1.1.
async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("request metrics");
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .await
        .expect("read metrics");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// A rotator and one agent with their metrics endpoints, in `dir`.
struct Pair {
    _agent: Daemon,
    _rotator: Daemon,
    agent_addr: SocketAddr,
    agent_metrics: SocketAddr,
    rotator_metrics: SocketAddr,
    admin_config: PathBuf,
    admin: Leaf,
    ca_pem: String,
    repo: PathBuf,
}

async fn start_pair(dir: &Path) -> Pair {
    let ca = Ca::new("fernetd test CA");
    let pki = dir.join("pki");
    let agent_tls = TlsFiles::write(&pki, "agent", &ca, &ca.issue(&[AGENT_ID]));
    let rotator_tls = TlsFiles::write(&pki, "rotator", &ca, &ca.issue(&[ROTATOR_ID]));
    let admin = ca.issue(&[ADMIN_ID]);

    let repo = dir.join("keystone/fernet-keys");
    std::fs::create_dir_all(&repo).expect("repository directory");
    let agent_addr = free_addr();
    let agent = AgentConfig {
        region: "RegionOne".into(),
        listen: agent_addr,
        metrics: Some(free_addr()),
        rotator_identity: ROTATOR_ID.into(),
        // The test polls the agent's health with the admin certificate.
        monitor_identities: vec![ADMIN_ID.into()],
        drift: Default::default(),
        drift_check: Duration::from_secs(60),
        max_message_bytes: fernetd::config::DEFAULT_MAX_MESSAGE_BYTES,
        request_timeout: fernetd::config::DEFAULT_REQUEST_TIMEOUT,
        first_request_timeout: fernetd::config::DEFAULT_FIRST_REQUEST_TIMEOUT,
        log_format: None,
        tls: agent_tls.to_config(),
        repositories: vec![AgentRepository {
            name: "tokens".into(),
            path: repo.clone(),
            owner: None,
        }],
        keystone_conf: None,
        audit_log: None,
        credential: None,
        readiness: Default::default(),
    };
    let agent_path = dir.join("agent.toml");
    write_file(&agent_path, &toml::to_string(&agent).expect("agent.toml"));

    let rotator_addr = free_addr();
    let rotator = RotatorConfig {
        listen: rotator_addr,
        metrics_listen: Some(free_addr()),
        tls: rotator_tls.to_config(),
        admin_identities: vec![ADMIN_ID.into()],
        state_dir: dir.join("rotator-state"),
        repositories: vec![RepositoryConfig {
            name: "tokens".into(),
            max_active_keys: 3,
            import: None,
            schedule: None,
        }],
        schedule: ScheduleConfig {
            cron: "0 3 * * *".into(),
        },
        policy: PolicyConfig {
            token_expiration: Duration::from_secs(3600),
            allow_expired_window: Duration::ZERO,
        },
        agents: vec![AgentEndpoint {
            name: None,
            region: "RegionOne".into(),
            endpoint: format!("https://{agent_addr}"),
            identity: AGENT_ID.into(),
        }],
        fanout: FanoutConfig {
            concurrency: 2,
            call_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            reconcile_interval: Duration::from_secs(1),
            ack_wait: Duration::from_secs(20),
            quarantine_after: None,
        },
        keystone_conf: None,
        audit_log: None,
        seal_key: None,
        ha: None,
        credential: None,
    };
    let rotator_path = dir.join("rotator.toml");
    write_file(
        &rotator_path,
        &toml::to_string(&rotator).expect("rotator.toml"),
    );

    let mut agent_daemon = Daemon::spawn(
        "monitoring-agent",
        ["agent", "--config", agent_path.to_str().expect("utf-8")],
    );
    agent_daemon
        .wait_healthy(
            agent_addr,
            client_tls(ca.cert_pem(), Some(&admin), AGENT_ID),
            "",
        )
        .await;
    let mut rotator_daemon = Daemon::spawn(
        "monitoring-rotator",
        ["rotator", "--config", rotator_path.to_str().expect("utf-8")],
    );
    rotator_daemon
        .wait_healthy(
            rotator_addr,
            client_tls(ca.cert_pem(), Some(&admin), ROTATOR_ID),
            "fernetd.v1.Admin",
        )
        .await;
    let admin_config = dir.join("admin.toml");
    let admin_tls = TlsFiles::write(&pki, "admin", &ca, &admin);
    let admin_toml = AdminConfig {
        rotator: format!("https://{rotator_addr}").into(),
        rotator_identity: ROTATOR_ID.into(),
        tls: admin_tls.to_config(),
    };
    write_file(
        &admin_config,
        &toml::to_string(&admin_toml).expect("admin.toml"),
    );
    Pair {
        _agent: agent_daemon,
        _rotator: rotator_daemon,
        agent_addr,
        admin_config,
        admin,
        ca_pem: ca.cert_pem().to_string(),
        repo,
        agent_metrics: agent.metrics.expect("agent metrics address"),
        rotator_metrics: rotator.metrics_listen.expect("rotator metrics address"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_the_alert_rules_and_the_dashboard_exists_in_the_scrapes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pair = start_pair(dir.path()).await;
    // Wait until the agent acknowledged the first generation, so the
    // per-agent and per-repository series have samples, not just descriptors.
    poll_until(Duration::from_secs(30), "the agent's acknowledgement", || async {
        let text = scrape(pair.rotator_metrics).await;
        text.contains("fernetd_rotator_agent_lag{agent=\"RegionOne\",region=\"RegionOne\",repository=\"tokens\"} 0")
            .then_some(text)
    })
    .await;
    // Counters appear with their first event: a rotation, a refused install
    // (from the admin's certificate, not the rotator's) and a drift.
    let rotate = Command::new(crate::common::fernetd_bin())
        .args(["admin", "--config"])
        .arg(&pair.admin_config)
        .args(["rotate", "--wait", "30"])
        .output()
        .expect("run fernetd admin rotate");
    assert!(
        rotate.status.success(),
        "{}",
        String::from_utf8_lossy(&rotate.stderr)
    );
    let channel = crate::common::daemon::connect(
        pair.agent_addr,
        client_tls(&pair.ca_pem, Some(&pair.admin), AGENT_ID),
    )
    .await
    .expect("connect to the agent");
    let refused = fernetd::pb::distribution_client::DistributionClient::new(channel)
        .install(fernetd::pb::InstallRequest {
            repository: "tokens".into(),
            ..Default::default()
        })
        .await
        .expect_err("an install from the admin is refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    write_file(
        &pair.repo.join("9"),
        "bm90IGEga2V5IGJ1dCBkcmlmdCBpcyBkcmlmdCEhIQ==\n",
    );
    let agent = poll_until(
        Duration::from_secs(30),
        "the agent's drift event",
        || async {
            let text = scrape(pair.agent_metrics).await;
            text.contains("fernetd_agent_drift_events_total{repository=\"tokens\"}")
                .then_some(text)
        },
    )
    .await;
    assert!(
        agent.contains(
            // Refused from the certificate, before the body (and its
            // repository name) is read.
            "fernetd_agent_refusals_total{repository=\"\",outcome=\"permission\"} 1"
        ),
        "{agent}"
    );
    let rotator = scrape(pair.rotator_metrics).await;
    assert!(
        rotator.contains("fernetd_rotator_rotations_total{repository=\"tokens\"} 1"),
        "{rotator}"
    );
    // The gauges this issue added carry real values: a scheduled rotation in
    // the future, and each daemon's certificate expiry.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let value = |text: &str, prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|rest| rest.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample {prefix} in\n{text}"))
    };
    let next = value(
        &rotator,
        "fernetd_rotator_next_rotation_timestamp_seconds{repository=\"tokens\"}",
    );
    assert!(
        next > now && next <= now + 86_400.0 + 1.0,
        "next rotation {next}, now {now}"
    );
    value(
        &rotator,
        "fernetd_rotator_purge_safe_timestamp_seconds{repository=\"tokens\"}",
    );
    for text in [&rotator, &agent] {
        let expiry = value(text, "fernetd_certificate_expiry_timestamp_seconds{path=");
        assert!(
            expiry > now,
            "certificate expiry {expiry} is not after now {now}"
        );
    }

    // The HA gauges exist only under `[ha]`; `ha::` checks a leader exports them.
    let exposed: BTreeSet<String> = exposed_names(&rotator)
        .into_iter()
        .chain(exposed_names(&agent))
        .chain(HA_ONLY.iter().map(|n| n.to_string()))
        .collect();
    let mut missing = Vec::new();
    let rules = read("deploy/prometheus/fernetd-rules.yml");
    for expr in alert_exprs(&rules) {
        for name in metric_names(&expr) {
            if !exposed.contains(&name) {
                missing.push(format!("rule `{expr}`: {name}"));
            }
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/fernetd.json")).expect("dashboard JSON");
    let mut used = BTreeSet::new();
    for expr in dashboard_exprs(&dashboard) {
        let names = metric_names(&expr);
        assert!(
            !names.is_empty(),
            "panel expr `{expr}` names no fernetd metric"
        );
        for name in names {
            if !exposed.contains(&name) {
                missing.push(format!("dashboard `{expr}`: {name}"));
            }
            used.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "metrics named but not exposed:\n{}\nexposed: {exposed:?}",
        missing.join("\n")
    );
    // And the other way: the dashboard shows every fernetd metric there is.
    let unshown: Vec<_> = exposed
        .iter()
        .filter(|n| {
            n.starts_with("fernetd_")
                && !used.contains(*n)
                && !(n.ends_with("_sum") || n.ends_with("_count") || n.ends_with("_created"))
        })
        .collect();
    assert!(
        unshown.is_empty(),
        "metrics without a dashboard panel: {unshown:?}"
    );
}
