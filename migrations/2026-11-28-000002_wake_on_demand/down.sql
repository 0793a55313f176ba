-- Back to notifying on every insert.
CREATE OR REPLACE FUNCTION outbox.notify_events_inserted() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('outbox_events', '');
    RETURN NULL;
END;
$$;
COMMENT ON FUNCTION outbox.notify_events_inserted() IS
    'Sends an empty NOTIFY on channel outbox_events; relays LISTEN to it.';
DROP TABLE outbox.relay_wakeup;
