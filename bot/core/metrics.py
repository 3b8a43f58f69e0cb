"""Counters and histograms for /metrics, on a registry per service instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.transactions = Counter(
            "safeguard_transactions",
            "Transactions received from the homeserver",
            ["outcome"],
            registry=r,
        )
        self.events = Counter(
            "safeguard_events", "Events received, by what became of them", ["outcome"], registry=r
        )
        self.errors = Counter(
            "safeguard_errors", "Errors, by where they happened", ["where"], registry=r
        )
        self.flags = Counter(
            "safeguard_flags", "Flags, accepted or refused (by reason)", ["outcome"], registry=r
        )
        self.steps = Counter(
            "safeguard_steps", "Case steps finished", ["step", "status"], registry=r
        )
        self.step_seconds = Histogram(
            "safeguard_step_seconds",
            "Time a case step took",
            ["step"],
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.flag_to_action_seconds = Histogram(
            "safeguard_flag_to_removal_seconds",
            "From the flag's arrival to the member's removal",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
        )
        self.audit_entries = Gauge(
            "safeguard_audit_entries", "Entries in the audit log (its chain head)", registry=r
        )
        self.rate_limited = Counter(
            "safeguard_rate_limited",
            "Homeserver answers of 429 (retried after retry_after_ms)",
            registry=r,
        )
        self.inbox_backlog = Gauge(
            "safeguard_inbox_backlog", "Events recorded but not yet acted on", registry=r
        )
        self.checkins = Gauge("safeguard_checkins", "Check-ins by state", ["state"], registry=r)
        # A gap in the homeserver's transaction ids past STRANDED_AFTER (bot/intake/stranded.py).
        self.stranded = Counter(
            "safeguard_stranded_transactions",
            "Gaps in the homeserver's transaction ids that lasted past a few seconds",
            registry=r,
        )
        self.stranded_resolved = Counter(
            "safeguard_stranded_transactions_resolved",
            "Stranded gaps closed: recovered (the transaction came) or abandoned",
            ["outcome"],
            registry=r,
        )
        self.stranded_nudges = Counter(
            "safeguard_stranded_nudges",
            "Pushes answered 503 once (and a ping) to make the homeserver resend",
            registry=r,
        )
