//! Time for the rotator: the cron schedule (UTC), the shortest interval it can
//! produce (what Keystone's `max_active_keys` formula must be checked against),
//! and the per-agent retry delay (exponential backoff with jitter).

use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;

/// Why a schedule is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("invalid cron expression `{expr}`")]
    Parse {
        expr: String,
        #[source]
        source: croner::errors::CronError,
    },
    #[error("cron expression `{0}` never fires")]
    Never(String),
}

/// A parsed cron schedule, evaluated in UTC.
#[derive(Debug, Clone)]
pub struct Schedule {
    expr: String,
    cron: Cron,
}

/// How many consecutive occurrences are examined to find the shortest interval:
/// enough to cover a year of a daily schedule, every weekday and month pattern.
const INTERVAL_SAMPLES: usize = 1000;

impl Schedule {
    pub fn parse(expr: &str) -> Result<Self, ScheduleError> {
        let cron = expr
            .parse::<Cron>()
            .map_err(|source| ScheduleError::Parse {
                expr: expr.to_owned(),
                source,
            })?;
        let schedule = Schedule {
            expr: expr.to_owned(),
            cron,
        };
        schedule
            .next_after(Utc::now())
            .ok_or_else(|| ScheduleError::Never(expr.to_owned()))?;
        Ok(schedule)
    }

    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The first occurrence strictly after `now`.
    pub fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&now, false).ok()
    }

    /// The shortest gap between two consecutive occurrences after `from`: the
    /// rotation interval Keystone's formula must hold for, since keys age fastest
    /// there. `None` when the schedule fires at most once.
    pub fn min_interval(&self, from: DateTime<Utc>) -> Option<Duration> {
        let mut previous = self.next_after(from)?;
        let mut shortest: Option<Duration> = None;
        for _ in 0..INTERVAL_SAMPLES {
            let Some(next) = self.next_after(previous) else {
                break;
            };
            let gap = (next - previous).to_std().unwrap_or(Duration::ZERO);
            shortest = Some(shortest.map_or(gap, |s| s.min(gap)));
            previous = next;
        }
        shortest
    }

    /// [`Schedule::min_interval`], or a year when the schedule fires at most
    /// once: the interval the key-lifetime checks and the schedule loop use.
    pub fn rotation_interval(&self, from: DateTime<Utc>) -> Duration {
        self.min_interval(from)
            .unwrap_or(Duration::from_secs(365 * 86_400))
    }

    /// How long to sleep from `now` until the next occurrence.
    pub fn delay_from(&self, now: DateTime<Utc>) -> Option<(DateTime<Utc>, Duration)> {
        let next = self.next_after(now)?;
        Some((next, (next - now).to_std().unwrap_or(Duration::ZERO)))
    }
}

/// Exponential backoff with "equal jitter": the delay after `failures` failures
/// lies in `[d/2, d]` where `d = min(max, base * 2^(failures-1))`, so agents that
/// failed together do not retry together, yet a retry is never sooner than half
/// the nominal delay.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The nominal (un-jittered) delay after `failures` consecutive failures.
    pub fn nominal(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let shift = (failures - 1).min(32);
        self.base
            .checked_mul(1u32 << shift.min(31))
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The delay to wait, jittered with `unit` drawn uniformly from `[0, 1)`.
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let nominal = self.nominal(failures);
        let half = nominal / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// [`Backoff::delay`] with a random jitter.
    pub fn delay_random(&self, failures: u32) -> Duration {
        self.delay(failures, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, h, m, s)
            .single()
            .expect("valid time")
    }

    #[test]
    fn cron_is_evaluated_in_utc_with_optional_seconds() {
        let daily = Schedule::parse("0 3 * * *").expect("parse");
        assert_eq!(daily.next_after(at(2, 59, 59)), Some(at(3, 0, 0)));
        assert_eq!(
            daily.min_interval(at(0, 0, 0)),
            Some(Duration::from_secs(86_400))
        );
        let fast = Schedule::parse("*/10 * * * * *").expect("parse");
        assert_eq!(fast.next_after(at(1, 0, 0)), Some(at(1, 0, 10)));
        assert_eq!(
            fast.min_interval(at(1, 0, 3)),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn min_interval_finds_the_shortest_gap_of_an_irregular_schedule() {
        // 00:00 and 06:00: gaps of 6 h and 18 h; the formula must use 6 h.
        let s = Schedule::parse("0 0,6 * * *").expect("parse");
        assert_eq!(
            s.min_interval(at(7, 0, 0)),
            Some(Duration::from_secs(6 * 3600))
        );
    }

    #[test]
    fn bad_expressions_are_refused_with_the_expression_named() {
        let e = Schedule::parse("every day").expect_err("must fail");
        assert!(e.to_string().contains("every day"), "{e}");
        assert!(
            Schedule::parse("0 0 31 2 *").is_err(),
            "February 31st never fires"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        assert_eq!(b.nominal(0), Duration::ZERO);
        assert_eq!(b.nominal(1), Duration::from_millis(100));
        assert_eq!(b.nominal(4), Duration::from_millis(800));
        assert_eq!(b.nominal(10), Duration::from_secs(5));
        assert_eq!(b.nominal(u32::MAX), Duration::from_secs(5));
        assert_eq!(b.delay(4, 0.0), Duration::from_millis(400));
        assert_eq!(b.delay(4, 1.0), Duration::from_millis(800));
        for _ in 0..100 {
            let d = b.delay_random(3);
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
                "{d:?}"
            );
        }
    }

    /// The scheduler sleeps on tokio's clock; with time paused, sleeping until
    /// each occurrence advances virtual time by exactly the cron gaps.
    #[tokio::test(start_paused = true)]
    async fn sleeping_until_each_occurrence_follows_the_cron_gaps() {
        let s = Schedule::parse("0 0,6 * * *").expect("parse");
        let wall_start = at(5, 0, 0);
        let start = tokio::time::Instant::now();
        let wall = || wall_start + chrono::Duration::from_std(start.elapsed()).expect("small");
        let mut fired = Vec::new();
        for _ in 0..3 {
            let (next, delay) = s.delay_from(wall()).expect("fires");
            tokio::time::sleep(delay).await;
            assert_eq!(wall(), next);
            fired.push(start.elapsed().as_secs() / 3600);
        }
        assert_eq!(fired, vec![1, 19, 25]);
    }
}
