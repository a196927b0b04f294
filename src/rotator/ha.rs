//! High availability (`[ha]`): several rotators with one configuration, one
//! leader elected through an etcd lease, the state in etcd. The leader holds
//! `<prefix>/leader` (created only when absent, attached to its lease, its
//! value unique to this term); every write it makes (a new generation, the
//! ledger, acknowledgements) is one etcd transaction that also compares that
//! key with its own value, so a deposed leader (a GC pause, SIGSTOP, a
//! partition) commits nothing, whatever it believes. A generation is written
//! twice in the same transaction: as `current` and as `gen/<G>`, the latter
//! created only when absent, so etcd itself refuses a second digest for one
//! generation. Keys are sealed (`crate::seal`) before they leave the process;
//! `current` and `gen/<G>` are bound to repository, generation and digest, the
//! ledger to the repository and its generation, the acknowledgements to their
//! purpose (`state::Binding`). A `current` older than the newest `gen/<G>` (an
//! older value copied back) is refused at every load: the create-only history
//! is the high-water mark. Values of the first format (bound to the name only,
//! ledger and acknowledgements in the clear) still load while any `current` of
//! that format is read, and each is rewritten in the new binding by the next
//! write.
//!
//! A standby serves reads from what it last read from etcd (refreshed every
//! third of the lease) and refuses mutations naming the leader. A leader that
//! cannot renew its lease within the TTL (etcd unreachable) stops rotating and
//! says so in status and metrics; the agents are not touched.
//!
//! The first leader of an empty prefix imports the rotator's file state (a
//! single rotator moving to HA: generations and ledger kept, so no agent
//! re-installs anything), or adopts `import` or a fresh set as a single
//! rotator would.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, TlsOptions, Txn, TxnOp};
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::RotatorError;
use super::ledger::Ledger;
use super::state::{self, Acks, Committed};
use crate::config::{HaConfig, RotatorConfig};
use crate::pb;
use crate::seal::SealKey;

/// Why a leader that etcd answered stopped leading.
const LEASE_EXPIRED: &str = "the lease expired (this process was paused or cut off longer than lease_ttl): another rotator may lead";

/// What goes wrong with etcd or the election. Never carries a key.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error("etcd: {what}")]
    Etcd {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd did not answer {what} within {ms}ms")]
    Timeout { what: String, ms: u128 },
    #[error("not the leader; the leader is {leader}")]
    NotLeader { leader: String },
    #[error(
        "etcd already holds generation {generation} of `{repository}` with another digest: refusing a fork"
    )]
    Fork { repository: String, generation: u64 },
    #[error(
        "etcd's `current` of `{repository}` holds generation {current}, but generation {committed} was committed (its `gen/` history key exists): refusing a rolled-back state"
    )]
    Rollback {
        repository: String,
        current: u64,
        committed: u64,
    },
    #[error(
        "etcd's ledger of `{repository}` belongs to generation {ledger}, older than the committed generation {generation}: refusing a replayed ledger"
    )]
    StaleLedger {
        repository: String,
        ledger: u64,
        generation: u64,
    },
    #[error("etcd value {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("cannot seal or unseal {key}")]
    Seal {
        key: String,
        #[source]
        source: crate::seal::SealError,
    },
    #[error("cannot read {path}")]
    Tls {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The leader key's value: who leads, and a token unique to this term.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaderValue {
    advertise: String,
    token: String,
}

/// One generation as stored in etcd: numbers in the clear, keys sealed.
#[derive(Debug, Serialize, Deserialize)]
struct StoredGeneration {
    /// The binding's version: absent (1) bound the name only, 2 binds
    /// repository, generation and digest.
    #[serde(default = "first_format")]
    version: u32,
    generation: u64,
    digest: String,
    /// The state file's text, sealed.
    sealed: String,
}

/// A sealed ledger or acknowledgements in etcd (the first format held their
/// JSON in the clear).
#[derive(Debug, Serialize, Deserialize)]
struct StoredSealed {
    version: u32,
    /// The generation a ledger belongs to (none for acknowledgements).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    generation: Option<u64>,
    sealed: String,
}

fn first_format() -> u32 {
    1
}

/// The version of the binding this build writes.
const BINDING: u32 = 2;
/// What etcd's blobs are bound to beside their [`state::Binding`].
const ENGINE: &str = "etcd";

/// The role shown by `admin status` and the metrics.
#[derive(Debug, Clone, Default)]
struct Role {
    leader: bool,
    /// The leader's advertised address, when known.
    leader_at: String,
    detail: String,
}

/// One term of leadership: its lease and the leader key's value.
#[derive(Debug, Clone)]
struct Term {
    lease: i64,
    value: Vec<u8>,
}

/// The etcd state backend and the election.
pub struct EtcdState {
    client: Client,
    prefix: String,
    seal: Arc<SealKey>,
    advertise: String,
    pub(super) ttl: Duration,
    term: Mutex<Option<Term>>,
    role: Mutex<Role>,
    /// Unix ms of the last successful lease renewal of this term.
    renewed_ms: AtomicI64,
    /// Cancelled when this term ends (a failed fence, a lost lease).
    term_stop: Mutex<CancellationToken>,
    leader_gauge: Gauge,
    etcd_gauge: Gauge,
    /// Whether a `current` of the first format was read: until each is
    /// rewritten, a clear ledger or acknowledgements are that format's too.
    first_format_seen: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for EtcdState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdState")
            .field("prefix", &self.prefix)
            .field("advertise", &self.advertise)
            .finish_non_exhaustive()
    }
}

fn etcd(what: &str) -> impl FnOnce(etcd_client::Error) -> HaError + '_ {
    move |source| HaError::Etcd {
        what: what.to_owned(),
        source,
    }
}

impl EtcdState {
    /// Connects to etcd (lazily: an unreachable cluster shows at the first call).
    pub(super) async fn connect(
        config: &RotatorConfig,
        ha: &HaConfig,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<EtcdState, RotatorError> {
        let seal = Arc::new(SealKey::load(&ha.seal_key)?);
        let request_timeout = (ha.lease_ttl / 3).max(Duration::from_millis(300));
        let mut options = ConnectOptions::new()
            .with_connect_timeout(request_timeout)
            .with_timeout(request_timeout)
            .with_keep_alive(request_timeout, request_timeout);
        if let Some(ca) = &ha.ca {
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|source| {
                    RotatorError::Ha(HaError::Tls {
                        path: path.to_path_buf(),
                        source,
                    })
                })
            };
            let mut tls =
                TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&ha.cert, &ha.key) {
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        let client = Client::connect(&ha.endpoints, Some(options))
            .await
            .map_err(|e| RotatorError::Ha(etcd("connect")(e)))?;
        let leader_gauge = Gauge::default();
        let etcd_gauge = Gauge::default();
        registry.register(
            "ha_leader",
            "1 while this rotator leads (holds the etcd lease), 0 as a standby",
            leader_gauge.clone(),
        );
        registry.register(
            "ha_etcd_reachable",
            "1 when the last etcd call answered, 0 when etcd is unreachable",
            etcd_gauge.clone(),
        );
        Ok(EtcdState {
            client,
            prefix: ha.prefix.clone(),
            seal,
            advertise: ha
                .advertise
                .clone()
                .unwrap_or_else(|| format!("https://{}", config.listen)),
            ttl: ha.lease_ttl,
            term: Mutex::new(None),
            role: Mutex::new(Role {
                detail: "starting: not yet in contact with etcd".into(),
                ..Role::default()
            }),
            renewed_ms: AtomicI64::new(0),
            term_stop: Mutex::new(CancellationToken::new()),
            leader_gauge,
            etcd_gauge,
            first_format_seen: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.prefix)
    }

    fn leader_key(&self) -> String {
        self.key("leader")
    }

    fn client(&self) -> Client {
        self.client.clone()
    }

    fn reachable(&self, up: bool) {
        self.etcd_gauge.set(i64::from(up));
    }

    /// Runs one etcd call with the lease's third as deadline, recording
    /// whether etcd answered.
    async fn call<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, HaError> {
        let deadline = (self.ttl / 3).max(Duration::from_millis(300));
        let result = match tokio::time::timeout(deadline, call).await {
            Ok(r) => r.map_err(etcd(what)),
            Err(_) => Err(HaError::Timeout {
                what: what.to_owned(),
                ms: deadline.as_millis(),
            }),
        };
        self.reachable(result.is_ok());
        result
    }

    /// Whether this instance leads now.
    pub(super) fn is_leader(&self) -> bool {
        lock(&self.term).is_some()
    }

    /// Refuses a mutation on a standby, naming the leader.
    pub(super) fn require_leader(&self) -> Result<(), HaError> {
        if self.is_leader() {
            return Ok(());
        }
        let role = lock(&self.role).clone();
        Err(HaError::NotLeader {
            leader: if role.leader_at.is_empty() {
                "unknown (no leader holds the lease)".into()
            } else {
                role.leader_at
            },
        })
    }

    /// The role for `admin status`.
    pub(super) fn status(&self) -> pb::HaStatus {
        let role = lock(&self.role).clone();
        pb::HaStatus {
            role: if role.leader { "leader" } else { "standby" }.into(),
            leader: role.leader_at,
            detail: role.detail,
        }
    }

    /// A standby that cannot campaign: says why, keeping who led last.
    pub(super) fn unreachable(&self, error: &HaError) {
        let why = format!("etcd unreachable: {}", crate::error_chain(error));
        let at = lock(&self.role).leader_at.clone();
        self.set_role(false, at, why);
    }

    fn set_role(&self, leader: bool, leader_at: String, detail: String) {
        self.leader_gauge.set(i64::from(leader));
        *lock(&self.role) = Role {
            leader,
            leader_at,
            detail,
        };
    }

    /// The fence every leader write carries.
    fn fence(&self) -> Result<Compare, HaError> {
        // Cloned out first: `require_leader` takes the same lock.
        let term = lock(&self.term).clone();
        match term {
            Some(term) => Ok(Compare::value(
                self.leader_key(),
                CompareOp::Equal,
                term.value,
            )),
            None => Err(self.require_leader().err().unwrap_or(HaError::NotLeader {
                leader: "unknown".into(),
            })),
        }
    }

    /// Ends this term at once: a failed fence means another leads.
    pub(super) fn lose(&self, why: &str) {
        if lock(&self.term).take().is_some() {
            tracing::warn!(reason = %why, "stepping down: no longer the leader");
            lock(&self.term_stop).cancel();
        }
        let at = lock(&self.role).leader_at.clone();
        self.set_role(
            false,
            if at == self.advertise {
                String::new()
            } else {
                at
            },
            why.to_owned(),
        );
    }

    /// A fenced transaction: `ops` happen only while this term leads.
    async fn fenced(
        &self,
        what: &str,
        extra: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<bool, HaError> {
        let mut compares = vec![self.fence()?];
        compares.extend(extra);
        let txn = Txn::new().when(compares).and_then(ops);
        let mut client = self.client();
        let response = self.call(what, client.txn(txn)).await?;
        Ok(response.succeeded())
    }

    /// After a failed fenced write: whether it failed because this term ended.
    async fn still_leading(&self) -> Result<bool, HaError> {
        let Some(term) = lock(&self.term).clone() else {
            return Ok(false);
        };
        let mut client = self.client();
        let got = self
            .call("read the leader", client.get(self.leader_key(), None))
            .await?;
        let ours = got
            .kvs()
            .first()
            .is_some_and(|kv| kv.value() == term.value.as_slice());
        if !ours {
            self.lose(
                "the leader key is no longer ours (the lease expired: another rotator leads)",
            );
        }
        Ok(ours)
    }

    fn seal_error(key: &str) -> impl FnOnce(crate::seal::SealError) -> HaError + '_ {
        move |source| HaError::Seal {
            key: key.to_owned(),
            source,
        }
    }

    fn seal_committed(&self, name: &str, committed: &Committed) -> Result<Vec<u8>, HaError> {
        let text = state::encode_state(name, committed);
        let digest = committed.keys.digest().to_hex();
        let binding = state::Binding::State {
            name,
            generation: committed.generation,
            digest: &digest,
        };
        let sealed = self
            .seal
            .seal(&binding.context(ENGINE), text.as_bytes())
            .map_err(Self::seal_error(name))?;
        let stored = StoredGeneration {
            version: BINDING,
            generation: committed.generation,
            digest,
            sealed,
        };
        Ok(serde_json::to_vec(&stored).unwrap_or_default())
    }

    fn unseal(&self, key: &str, name: &str, value: &[u8]) -> Result<Committed, HaError> {
        self.unseal_versioned(key, name, value)
            .map(|(committed, _)| committed)
    }

    /// [`EtcdState::unseal`], with the binding's version the value had.
    fn unseal_versioned(
        &self,
        key: &str,
        name: &str,
        value: &[u8],
    ) -> Result<(Committed, u32), HaError> {
        let corrupt = |reason: String| HaError::Corrupt {
            key: key.to_owned(),
            reason,
        };
        let stored: StoredGeneration =
            serde_json::from_slice(value).map_err(|e| corrupt(e.to_string()))?;
        let context = match stored.version {
            1 => format!("fernetd etcd: {name}"),
            BINDING => state::Binding::State {
                name,
                generation: stored.generation,
                digest: &stored.digest,
            }
            .context(ENGINE),
            v => return Err(corrupt(format!("unknown binding version {v}"))),
        };
        let clear = self
            .seal
            .open(&context, &stored.sealed)
            .map_err(Self::seal_error(key))?;
        let committed = state::parse_state(&clear, name).map_err(corrupt)?;
        if committed.generation != stored.generation
            || committed.keys.digest().to_hex() != stored.digest
        {
            return Err(corrupt(
                "the sealed keys do not match the clear generation and digest".into(),
            ));
        }
        Ok((committed, stored.version))
    }

    /// `json` sealed as a [`StoredSealed`] bound to `binding`.
    fn seal_json(
        &self,
        key: &str,
        binding: state::Binding<'_>,
        generation: Option<u64>,
        json: &[u8],
    ) -> Result<Vec<u8>, HaError> {
        let sealed = self
            .seal
            .seal(&binding.context(ENGINE), json)
            .map_err(Self::seal_error(key))?;
        let stored = StoredSealed {
            version: BINDING,
            generation,
            sealed,
        };
        Ok(serde_json::to_vec(&stored).unwrap_or_default())
    }

    /// The JSON a [`StoredSealed`] value holds, opened with the binding
    /// `binding` makes of its generation; a clear value only when
    /// `first_format` (it belongs to a `current` of the first format).
    fn open_json<'a>(
        &self,
        key: &str,
        value: &[u8],
        first_format: bool,
        binding: impl FnOnce(Option<u64>) -> Result<state::Binding<'a>, HaError>,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, HaError> {
        let corrupt = |reason: String| HaError::Corrupt {
            key: key.to_owned(),
            reason,
        };
        match serde_json::from_slice::<StoredSealed>(value) {
            Ok(stored) if stored.version == BINDING => self
                .seal
                .open(&binding(stored.generation)?.context(ENGINE), &stored.sealed)
                .map_err(Self::seal_error(key)),
            Ok(stored) => Err(corrupt(format!(
                "unknown binding version {}",
                stored.version
            ))),
            Err(_) if first_format => {
                Ok(zeroize::Zeroizing::new(value.to_vec()))
            }
            Err(_) => Err(corrupt(
                "not sealed: a clear value where a sealed one is expected (tampered, or written by another tool)".into(),
            )),
        }
    }

    /// The sealed value of a ledger of `name` at `generation`.
    fn seal_ledger(
        &self,
        name: &str,
        generation: u64,
        ledger: &Ledger,
    ) -> Result<Vec<u8>, HaError> {
        let json = serde_json::to_vec(ledger).unwrap_or_default();
        self.seal_json(
            name,
            state::Binding::Ledger { name, generation },
            Some(generation),
            &json,
        )
    }

    /// Commits a generation and its ledger: one fenced transaction, the
    /// generation's history key created only when absent.
    pub(super) async fn commit(
        &self,
        name: &str,
        ledger: &Ledger,
        committed: &Committed,
    ) -> Result<(), HaError> {
        let value = self.seal_committed(name, committed)?;
        let history = self.key(&format!("repos/{name}/gen/{:020}", committed.generation));
        let ledger_json = self.seal_ledger(name, committed.generation, ledger)?;
        let ops = vec![
            TxnOp::put(
                self.key(&format!("repos/{name}/current")),
                value.clone(),
                None,
            ),
            TxnOp::put(history.clone(), value, None),
            TxnOp::put(self.key(&format!("repos/{name}/ledger")), ledger_json, None),
        ];
        let mut ops = ops;
        if self.first_format_seen.load(Ordering::Acquire) {
            // The first commit in the new binding may end the first format's
            // `current`s: the acknowledgements are sealed in the same
            // transaction, so no later start finds them in the clear.
            let acks = serde_json::to_vec(&self.load_acks().await?).unwrap_or_default();
            ops.push(TxnOp::put(
                self.key("acks"),
                self.seal_json("acks", state::Binding::Acks, None, &acks)?,
                None,
            ));
        }
        let created = Compare::create_revision(history.clone(), CompareOp::Equal, 0);
        match self.fenced("commit a generation", vec![created], ops).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            // The transaction may have landed with its answer lost: read back.
            Err(e @ (HaError::Timeout { .. } | HaError::Etcd { .. })) => {
                return match self.read_back(&history, name, committed).await {
                    Some(true) => Ok(()),
                    Some(false) => Err(HaError::Fork {
                        repository: name.to_owned(),
                        generation: committed.generation,
                    }),
                    None => Err(e),
                };
            }
            Err(e) => return Err(e),
        }
        // An earlier attempt of this very commit may have landed unanswered.
        if self.landed(&history, name, committed).await? == Some(true) {
            return Ok(());
        }
        if self.still_leading().await? {
            Err(HaError::Fork {
                repository: name.to_owned(),
                generation: committed.generation,
            })
        } else {
            self.require_leader()
        }
    }

    /// Whether generation `committed` of `name` is in etcd's history with its
    /// digest (`Some(false)`: with another digest; `None`: not there).
    async fn landed(
        &self,
        history: &str,
        name: &str,
        committed: &Committed,
    ) -> Result<Option<bool>, HaError> {
        let mut client = self.client();
        let got = self
            .call("read a generation back", client.get(history, None))
            .await?;
        let Some(kv) = got.kvs().first() else {
            return Ok(None);
        };
        let stored = self.unseal(history, name, kv.value())?;
        Ok(Some(
            stored.generation == committed.generation
                && stored.keys.digest() == committed.keys.digest(),
        ))
    }

    /// After a commit whose answer was lost: reads its generation back for up
    /// to a lease's time, while this rotator leads. `Some(true)` when it
    /// landed, `Some(false)` when another set holds the generation, `None`
    /// when it did not land or etcd stayed unreachable.
    async fn read_back(&self, history: &str, name: &str, committed: &Committed) -> Option<bool> {
        let deadline = tokio::time::Instant::now() + self.ttl;
        loop {
            match self.landed(history, name, committed).await {
                Ok(Some(landed)) => return Some(landed),
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(repository = %name, generation = committed.generation, error = %crate::error_chain(&e), "cannot read back a commit whose answer was lost; retrying");
                }
            }
            if !self.is_leader() || tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(self.ttl / 6).await;
        }
    }

    /// Records a repository's ledger (fenced), sealed for its `generation`.
    pub(super) async fn save_ledger(
        &self,
        name: &str,
        generation: u64,
        ledger: &Ledger,
    ) -> Result<(), HaError> {
        let op = TxnOp::put(
            self.key(&format!("repos/{name}/ledger")),
            self.seal_ledger(name, generation, ledger)?,
            None,
        );
        self.fenced_or_lose("record the ledger", op).await
    }

    /// Records acknowledgements (fenced).
    pub(super) async fn save_acks(&self, acks: &Acks) -> Result<(), HaError> {
        let json = serde_json::to_vec(acks).unwrap_or_default();
        let op = TxnOp::put(
            self.key("acks"),
            self.seal_json("acks", state::Binding::Acks, None, &json)?,
            None,
        );
        self.fenced_or_lose("record acknowledgements", op).await
    }

    async fn fenced_or_lose(&self, what: &str, op: TxnOp) -> Result<(), HaError> {
        if self.fenced(what, vec![], vec![op]).await? {
            return Ok(());
        }
        self.lose("a fenced write failed: another rotator leads");
        self.require_leader()
    }

    /// Records the JSON record `kind` of repository `name` (fenced; no key material).
    pub(super) async fn save_record<T: Serialize>(
        &self,
        name: &str,
        kind: &str,
        record: &T,
    ) -> Result<(), HaError> {
        let op = TxnOp::put(
            self.key(&format!("repos/{name}/{kind}")),
            serde_json::to_vec(record).unwrap_or_default(),
            None,
        );
        self.fenced_or_lose("record a repository's record", op)
            .await
    }

    /// The JSON record `kind` of repository `name`, if one was written.
    pub(super) async fn load_record<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        kind: &str,
    ) -> Result<Option<T>, HaError> {
        let mut client = self.client();
        let key = self.key(&format!("repos/{name}/{kind}"));
        let got = self
            .call("read a record", client.get(key.clone(), None))
            .await?;
        match got.kvs().first() {
            Some(kv) => {
                serde_json::from_slice(kv.value())
                    .map(Some)
                    .map_err(|e| HaError::Corrupt {
                        key,
                        reason: e.to_string(),
                    })
            }
            None => Ok(None),
        }
    }

    /// The committed generation and ledger of `name` in etcd, if any.
    pub(super) async fn load(
        &self,
        name: &str,
    ) -> Result<Option<(Committed, Option<Ledger>)>, HaError> {
        let mut client = self.client();
        let key = self.key(&format!("repos/{name}/current"));
        let got = self
            .call("read a generation", client.get(key.clone(), None))
            .await?;
        let Some(kv) = got.kvs().first() else {
            return Ok(None);
        };
        let (committed, version) = self.unseal_versioned(&key, name, kv.value())?;
        // The create-only history is the high-water mark: `current` must hold
        // the newest generation it names.
        let history = self.key(&format!("repos/{name}/gen/"));
        let newest = self
            .call(
                "read the newest generation",
                client.get(
                    history.clone(),
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_sort(
                                etcd_client::SortTarget::Key,
                                etcd_client::SortOrder::Descend,
                            )
                            .with_limit(1)
                            .with_keys_only(),
                    ),
                ),
            )
            .await?;
        if let Some(kv) = newest.kvs().first() {
            let newest: u64 = kv
                .key_str()
                .ok()
                .and_then(|k| k.strip_prefix(history.as_str()))
                .and_then(|g| g.parse().ok())
                .ok_or_else(|| HaError::Corrupt {
                    key: history.clone(),
                    reason: "a history key is not a generation".into(),
                })?;
            if committed.generation < newest {
                return Err(HaError::Rollback {
                    repository: name.to_owned(),
                    current: committed.generation,
                    committed: newest,
                });
            }
        }
        if version == 1 {
            // Only once it passed the high-water mark: an old value copied
            // into `current` opens no door to clear values.
            self.first_format_seen.store(true, Ordering::Release);
        }
        let ledger_key = self.key(&format!("repos/{name}/ledger"));
        let got = self
            .call("read a ledger", client.get(ledger_key.clone(), None))
            .await?;
        let ledger = match got.kvs().first() {
            Some(kv) => {
                let json = self.open_json(&ledger_key, kv.value(), version == 1, |generation| {
                    let generation = generation.unwrap_or_default();
                    if generation < committed.generation {
                        return Err(HaError::StaleLedger {
                            repository: name.to_owned(),
                            ledger: generation,
                            generation: committed.generation,
                        });
                    }
                    Ok(state::Binding::Ledger { name, generation })
                })?;
                Some(serde_json::from_slice(&json).map_err(|e| HaError::Corrupt {
                    key: ledger_key,
                    reason: e.to_string(),
                })?)
            }
            None => None,
        };
        Ok(Some((committed, ledger)))
    }

    /// The acknowledgements recorded in etcd; empty when none.
    pub(super) async fn load_acks(&self) -> Result<Acks, HaError> {
        let mut client = self.client();
        let key = self.key("acks");
        let got = self
            .call("read acknowledgements", client.get(key.clone(), None))
            .await?;
        match got.kvs().first() {
            Some(kv) => {
                let first_format = self.first_format_seen.load(Ordering::Acquire);
                let json =
                    self.open_json(&key, kv.value(), first_format, |_| Ok(state::Binding::Acks))?;
                serde_json::from_slice(&json).map_err(|e| HaError::Corrupt {
                    key,
                    reason: e.to_string(),
                })
            }
            None => Ok(Acks::new()),
        }
    }

    /// Tries to become the leader: a lease, and the leader key created only
    /// when absent. Learns who leads otherwise.
    pub(super) async fn campaign(&self) -> Result<bool, HaError> {
        if self.is_leader() {
            return Ok(true);
        }
        let mut client = self.client();
        // A read first: a standby polling a living leader grants no lease.
        let current = self
            .call("read the leader", client.get(self.leader_key(), None))
            .await?;
        if let Some(kv) = current.kvs().first() {
            let leader = serde_json::from_slice::<LeaderValue>(kv.value())
                .map(|v| v.advertise)
                .unwrap_or_default();
            self.set_role(false, leader, String::new());
            return Ok(false);
        }
        let ttl = i64::try_from(self.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = self
            .call("grant a lease", client.lease_grant(ttl, None))
            .await?
            .id();
        let value = serde_json::to_vec(&LeaderValue {
            advertise: self.advertise.clone(),
            token: hex::encode(rand::random::<[u8; 16]>()),
        })
        .unwrap_or_default();
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.leader_key(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(
                self.leader_key(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(self.leader_key(), None)]);
        let response = self.call("campaign", client.txn(txn)).await?;
        if response.succeeded() {
            self.renewed_ms
                .store(super::types::now_ms(), Ordering::Release);
            *lock(&self.term_stop) = CancellationToken::new();
            *lock(&self.term) = Some(Term { lease, value });
            self.set_role(true, self.advertise.clone(), String::new());
            tracing::info!(advertise = %self.advertise, "elected leader");
            return Ok(true);
        }
        let _ = self
            .call("revoke an unused lease", client.lease_revoke(lease))
            .await;
        let leader = response
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                etcd_client::TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .and_then(|kv| serde_json::from_slice::<LeaderValue>(kv.value()).ok()),
                _ => None,
            })
            .map(|v| v.advertise)
            .unwrap_or_default();
        self.set_role(false, leader, String::new());
        Ok(false)
    }

    /// Renews this term's lease once; ends the term when etcd says the lease
    /// is gone, or when no renewal succeeded for a whole TTL.
    pub(super) async fn renew(&self) {
        let Some(term) = lock(&self.term).clone() else {
            return;
        };
        let mut client = self.client();
        let renewed = self
            .call("renew the lease", async {
                let (mut keeper, mut stream) = client.lease_keep_alive(term.lease).await?;
                keeper.keep_alive().await?;
                Ok(stream.message().await?.map(|r| r.ttl()).unwrap_or(0))
            })
            .await;
        match renewed {
            Ok(ttl) if ttl > 0 => {
                self.renewed_ms
                    .store(super::types::now_ms(), Ordering::Release);
                let mut role = lock(&self.role);
                role.detail.clear();
            }
            Ok(_)
            | Err(HaError::Etcd {
                source: etcd_client::Error::LeaseKeepAliveError(_),
                ..
            }) => self.lose(LEASE_EXPIRED),
            Err(e) => {
                let since = super::types::now_ms() - self.renewed_ms.load(Ordering::Acquire);
                let why = format!("etcd unreachable: {}", crate::error_chain(&e));
                if u128::try_from(since).unwrap_or(0) >= self.ttl.as_millis() {
                    self.lose(&format!(
                        "{why}; the lease could not be renewed for lease_ttl, so rotation stopped"
                    ));
                } else {
                    lock(&self.role).detail = why;
                }
            }
        }
    }

    /// Gives the lease up on shutdown so a standby takes over at once.
    pub(super) async fn resign(&self) {
        let term = lock(&self.term).take();
        if let Some(term) = term {
            let mut client = self.client();
            let _ = self.call("resign", client.lease_revoke(term.lease)).await;
        }
    }

    pub(super) fn term_token(&self) -> CancellationToken {
        lock(&self.term_stop).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
