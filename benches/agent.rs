//! Agent throughput: an in-process `agent::run` over mutual TLS on loopback,
//! driven by a rotator-identity client through the real gRPC stack. Prints the
//! latency of a full `Install` (validate, atomic install with fsyncs, reload,
//! canaries), of an idempotent re-push, of 32 concurrent re-pushes of one set,
//! and of `GetState`.
//! Run: `cargo bench --bench agent` (optionally `-- DIR` for the repository's
//! filesystem; default: the system temporary directory).

use std::time::{Duration, Instant};

use fernetd::agent::check::to_wire;
use fernetd::config::{AgentConfig, AgentRepository, DriftPolicy, TlsConfig};
use fernetd::pb;
use fernetd::pb::distribution_client::DistributionClient;
use fernetd::repository::{self, KeySet};
use fernetd::tls::{Authority, ClientTls};

type Error = Box<dyn std::error::Error>;

/// Median, 99th percentile and maximum of `samples`, in milliseconds.
fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let ms = |i: usize| samples[i].as_secs_f64() * 1e3;
    let (n, p99) = (samples.len(), (samples.len() * 99).div_ceil(100) - 1);
    println!(
        "{what:<44} n={n:<5} median {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms",
        ms(n / 2),
        ms(p99),
        ms(n - 1)
    );
}

fn write_identity(
    dir: &std::path::Path,
    name: &str,
    ca: &Authority,
    san: &str,
) -> Result<TlsConfig, Error> {
    let issued = ca.issue(&[san])?;
    let files = TlsConfig {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.ca, ca.cert_pem())?;
    std::fs::write(&files.cert, &issued.cert_pem)?;
    std::fs::write(&files.key, issued.key_pem.as_bytes())?;
    Ok(files)
}

fn request(set: &KeySet, generation: u64) -> pb::InstallRequest {
    let canaries = [set.primary_index().unwrap_or(0), 0]
        .into_iter()
        .filter_map(|i| set.get(i).map(|k| (i, k)))
        .map(|(key_index, key)| pb::Canary {
            token: fernetd::token::canary(key),
            key_index,
        })
        .collect();
    pb::InstallRequest {
        repository: "tokens".into(),
        generation,
        keys: to_wire(set),
        digest: set.digest().0.to_vec(),
        canaries,
        restore: false,
        promoted_unix: Default::default(),
        emergency_purge: false,
    }
}

async fn bench(base: std::path::PathBuf) -> Result<(), Error> {
    let tmp = tempfile::tempdir_in(base)?;
    let ca = Authority::new("bench CA")?;
    let agent_tls = write_identity(tmp.path(), "agent", &ca, "agent.bench")?;
    let rotator_tls = write_identity(tmp.path(), "rotator", &ca, "rotator.bench")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = AgentConfig {
        region: "bench".into(),
        listen: addr,
        metrics: None,
        rotator_identity: "rotator.bench".into(),
        monitor_identities: Vec::new(),
        drift: DriftPolicy::Report,
        drift_check: Duration::from_secs(60),
        max_message_bytes: fernetd::config::DEFAULT_MAX_MESSAGE_BYTES,
        request_timeout: fernetd::config::DEFAULT_REQUEST_TIMEOUT,
        first_request_timeout: fernetd::config::DEFAULT_FIRST_REQUEST_TIMEOUT,
        log_format: None,
        tls: agent_tls,
        repositories: vec![AgentRepository {
            name: "tokens".into(),
            path: tmp.path().join("fernet-keys"),
            owner: None,
        }],
        keystone_conf: None,
        audit_log: None,
        credential: None,
        readiness: Default::default(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let checked = fernetd::agent::check(config).expect("valid agent configuration");
    let agent = tokio::spawn(fernetd::agent::run(checked, listener, None, async {
        let _ = stopped.await;
    }));
    let channel =
        ClientTls::load_once(&rotator_tls)?.channel(&format!("https://{addr}"), "agent.bench")?;
    let client = DistributionClient::new(channel);

    let mut set = repository::init(3)?;
    let mut generation = 1;
    client.clone().install(request(&set, generation)).await?;
    let mut installs = Vec::new();
    for _ in 0..200 {
        set = repository::rotate(&set, 3)?;
        generation += 1;
        let started = Instant::now();
        client.clone().install(request(&set, generation)).await?;
        installs.push(started.elapsed());
    }
    report("Install, new generation (3 keys)", installs);

    let mut repushes = Vec::new();
    for _ in 0..500 {
        let started = Instant::now();
        let done = client
            .clone()
            .install(request(&set, generation))
            .await?
            .into_inner();
        repushes.push(started.elapsed());
        assert!(done.unchanged, "a re-push must be answered as unchanged");
    }
    report("Install, idempotent re-push", repushes);

    let mut bursts = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let pushes: Vec<_> = (0..32)
            .map(|_| {
                let (mut c, r) = (client.clone(), request(&set, generation));
                tokio::spawn(async move { c.install(r).await })
            })
            .collect();
        for push in pushes {
            push.await??;
        }
        bursts.push(started.elapsed());
    }
    report("32 concurrent re-pushes of one set (total)", bursts);

    let mut states = Vec::new();
    for _ in 0..500 {
        let started = Instant::now();
        client
            .clone()
            .get_state(pb::GetStateRequest::default())
            .await?;
        states.push(started.elapsed());
    }
    report("GetState", states);

    let _ = stop.send(());
    agent.await??;
    Ok(())
}

fn main() -> Result<(), Error> {
    let base = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    println!("repository under {}", base.display());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench(base))
}
