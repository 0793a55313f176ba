-- Wake-ups that cost publishers nothing under load (docs/design.md).
--
-- A transaction that NOTIFYs takes a database-wide lock at commit and holds
-- it through its WAL flush, so notifying commits run one at a time: with 16
-- publishers, an always-notifying trigger cut commits/s by about 3x. But a
-- busy relay does not need notifications (it polls between rounds anyway);
-- only a relay that has gone to sleep does. So a sleeping relay says so in
-- outbox.relay_wakeup, and the trigger notifies only then. The relay that
-- receives the notification clears it again, so under load publishers stop
-- notifying within a round trip.

-- One row. UNLOGGED: it is a hint, rewritten all the time; writing it needs
-- no WAL flush, and after a crash it is simply empty (no relay is known to
-- be asleep) until a relay goes to sleep and writes it again.
CREATE UNLOGGED TABLE outbox.relay_wakeup (
    only_row boolean PRIMARY KEY DEFAULT true
        CONSTRAINT relay_wakeup_one_row CHECK (only_row),
    armed_until timestamptz
);
COMMENT ON TABLE outbox.relay_wakeup IS
    'One row: while armed_until is in the future some relay is asleep waiting for a NOTIFY, and the insert trigger sends one. Written by relays only; see docs/design.md.';
COMMENT ON COLUMN outbox.relay_wakeup.only_row IS 'Always true: the table has at most one row.';
COMMENT ON COLUMN outbox.relay_wakeup.armed_until IS
    'Set by a relay going to sleep (a few poll intervals ahead, so a relay that died stops costing publishers a NOTIFY), cleared by the relay that is woken. NULL: no relay is waiting.';

-- Every publisher's trigger reads it; publishers need no grant beyond
-- INSERT on outbox.events.
GRANT SELECT ON outbox.relay_wakeup TO PUBLIC;

CREATE OR REPLACE FUNCTION outbox.notify_events_inserted() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    IF EXISTS (SELECT FROM outbox.relay_wakeup WHERE armed_until > now()) THEN
        PERFORM pg_notify('outbox_events', '');
    END IF;
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION outbox.notify_events_inserted() IS
    'Sends an empty NOTIFY on channel outbox_events while a relay is asleep waiting for one (outbox.relay_wakeup).';
