-- Herald's transactional outbox (docs/backends.md).  An application inserts a
-- row (channel, data) in the same transaction as its own data; once committed, a
-- Herald consumer (`herald serve --outbox postgresql://...`) publishes it exactly once,
-- in commit order per channel, and deletes it.

-- CACHE 1 (the default): ids must be drawn in the order the trigger runs.
CREATE SEQUENCE IF NOT EXISTS herald_outbox_id_seq CACHE 1;

CREATE TABLE IF NOT EXISTS herald_outbox (
    -- Set by the trigger below, under the channel's write lock: within a channel,
    -- ids grow in commit order.  Herald publishes the row with the idempotency key
    -- 'outbox:herald_outbox:<id>'.
    id         bigint      PRIMARY KEY,
    -- A Herald channel name, e.g. 'orders:42'; its namespace must be configured.
    channel    text        NOT NULL,
    -- The publication's data: any JSON value.
    data       json        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- NULL while pending.  Herald sets it (and keeps the row) when the row can never
    -- be published, e.g. its channel's namespace is unknown; fix and set it to NULL to retry.
    failed     text
);

ALTER SEQUENCE herald_outbox_id_seq OWNED BY herald_outbox.id;

CREATE INDEX IF NOT EXISTS herald_outbox_pending ON herald_outbox (channel, id) WHERE failed IS NULL;

CREATE OR REPLACE FUNCTION herald_outbox_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $herald$
BEGIN
    -- Writers of one channel take turns, from their first row of it to their commit:
    -- ids drawn here therefore grow in commit order within the channel.
    PERFORM pg_advisory_xact_lock(hashtext('herald_outbox:write'), hashtext(NEW.channel));
    NEW.id := nextval('herald_outbox_id_seq');
    -- Delivered at commit (never for a rolled-back transaction), once per transaction.
    PERFORM pg_notify('herald_outbox', '');
    RETURN NEW;
END
$herald$;

DROP TRIGGER IF EXISTS herald_outbox_before_insert ON herald_outbox;
CREATE TRIGGER herald_outbox_before_insert BEFORE INSERT ON herald_outbox
    FOR EACH ROW EXECUTE FUNCTION herald_outbox_before_insert();
