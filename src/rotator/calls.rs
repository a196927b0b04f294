//! The rotator's calls to one agent, each bounded by a deadline: `Install`
//! (the generation's pre-encoded request written as a bare unary call on the
//! agent's connection, `tls::Connection::unary`) and `GetState` (a read-back).
//! The fan-out and the credential migrate make them; neither needs the core.

use std::time::Duration;

use super::fleet::AgentSlot;
use super::types::{Answer, Generation, RepoReport, Report};
use crate::pb;

const INSTALL: &str = "/fernetd.v1.Distribution/Install";

/// Pushes `generation` to `agent` (`Install`).
pub(super) async fn install(
    agent: &AgentSlot,
    generation: &Generation,
    timeout: Duration,
) -> Result<Answer, String> {
    let channel = &agent.channel;
    let call = || async move {
        let answer = channel
            .unary(INSTALL, generation.encoded(), timeout)
            .await
            .map_err(|s| crate::describe_status(&s))?;
        <pb::InstallResponse as prost::Message>::decode(answer)
            .map(|a| Answer {
                generation: a.generation,
                digest: a.digest,
                canaries_valid: a.canaries_valid,
            })
            .map_err(|e| format!("Install: undecodable answer: {e}"))
    };
    with_deadline(timeout, "Install", call).await
}

/// Reads agent `agent`'s state back (`GetState`), telling it the `current`
/// generation of each repository named: an agent holding them takes this, from
/// the rotator's identity only, as the confirmation that opens its readiness
/// gate (a restarted agent that needs no push). An empty `current` confirms
/// nothing.
pub(super) async fn get_state(
    agent: &AgentSlot,
    timeout: Duration,
    current: &[(&str, &Generation)],
) -> Result<Report, String> {
    let mut client = pb::distribution_client::DistributionClient::new(agent.channel.clone());
    let current = current
        .iter()
        .map(|(name, generation)| pb::RepositoryGeneration {
            name: (*name).to_owned(),
            generation: generation.number,
            digest: generation.digest.0.to_vec(),
        })
        .collect();
    let call = || async move {
        let mut request = tonic::Request::new(pb::GetStateRequest { current });
        request.set_timeout(timeout);
        client
            .get_state(request)
            .await
            .map(|r| report(r.into_inner()))
            .map_err(|s| crate::describe_status(&s))
    };
    with_deadline(timeout, "GetState", call).await
}

/// What a `GetState` answer says the agent holds.
fn report(state: pb::GetStateResponse) -> Report {
    Report {
        region: state.region,
        repositories: state
            .repositories
            .into_iter()
            .map(|r| RepoReport {
                name: r.name,
                generation: r.generation,
                digest: r.digest,
                drift: r.drift,
                drift_detail: r.drift_detail,
            })
            .collect(),
    }
}

/// The future `call` makes, failed with a message naming `what` when it has not
/// finished within `timeout`. It takes the maker, not the future: an async
/// fn's argument keeps its slot for the whole call, so a future passed in
/// would be held twice (as the argument and inside the timeout), and the call
/// task that awaits this is copied in whole when spawned.
async fn with_deadline<T, F: std::future::Future<Output = Result<T, String>>>(
    timeout: Duration,
    what: &str,
    call: impl FnOnce() -> F,
) -> Result<T, String> {
    let call = tokio::time::timeout(timeout, call());
    call.await.unwrap_or_else(|_| {
        Err(format!(
            "{what}: no answer within {}ms",
            timeout.as_millis()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[test]
    fn statuses_are_described_with_their_code() {
        let s = tonic::Status::failed_precondition("generation 3 is older than 5");
        assert_eq!(
            crate::describe_status(&s),
            "FailedPrecondition: generation 3 is older than 5"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_without_answer_fails_at_its_deadline() {
        let started = Instant::now();
        let r: Result<(), String> =
            with_deadline(Duration::from_secs(3), "Install", std::future::pending).await;
        assert_eq!(r, Err("Install: no answer within 3000ms".to_owned()));
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
