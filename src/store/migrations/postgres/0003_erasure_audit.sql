-- Erasure (issue 6): erasure requests and their receipts, the audit chain the receipts
-- are chained into, and fieldkey's own signing keys (wrapped by the KMS).

-- Set in the transaction that shreds a tenant; rotation and subject-key creation
-- lock the tenant row and refuse once it is set, so nothing live appears afterwards.
ALTER TABLE fk_tenants ADD COLUMN erased_at BIGINT NULL;

CREATE TABLE fk_erasures (
    erasure_id    TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL,
    subject_id    TEXT NULL,              -- NULL: the whole tenant
    state         TEXT NOT NULL CHECK (state IN ('scheduled', 'executing', 'completed', 'cancelled')),
    requested_by  TEXT NOT NULL,
    requested_at  BIGINT NOT NULL,
    execute_after BIGINT NOT NULL,       -- end of the grace period
    started_at    BIGINT NULL,
    completed_at  BIGINT NULL,
    executed_by   TEXT NULL,
    cancelled_by  TEXT NULL,
    cancelled_at  BIGINT NULL,
    attempts      BIGINT NOT NULL DEFAULT 0,
    last_error    TEXT NULL,
    receipt       TEXT NULL,              -- signed receipt (JSON), once completed
    audit_seq     BIGINT NULL,
    updated_at    BIGINT NOT NULL
);
-- at most one live (not cancelled) erasure per subject, and per tenant
CREATE UNIQUE INDEX fk_erasures_one_live ON fk_erasures (tenant_id, COALESCE(subject_id, ''))
    WHERE state <> 'cancelled';
CREATE INDEX fk_erasures_due ON fk_erasures (state, execute_after);

-- Append-only audit chain: each record holds the hash of the one before it.
CREATE TABLE fk_audit (
    seq           BIGINT PRIMARY KEY,
    ts            BIGINT NOT NULL,
    action        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    actor         TEXT NOT NULL,
    tenant_id     TEXT NULL,
    caller_ip     TEXT NULL,              -- masked (/24, /48)
    details       TEXT NOT NULL,          -- JSON object
    prev_hash     BYTEA NOT NULL,
    hash          BYTEA NOT NULL
);
CREATE FUNCTION fk_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'fk_audit is append-only'; END $$;
CREATE TRIGGER fk_audit_no_change BEFORE UPDATE OR DELETE ON fk_audit
    FOR EACH ROW EXECUTE FUNCTION fk_audit_append_only();
CREATE TRIGGER fk_audit_no_truncate BEFORE TRUNCATE ON fk_audit
    FOR EACH STATEMENT EXECUTE FUNCTION fk_audit_append_only();
-- The head of the chain: its row lock serializes appends.
CREATE TABLE fk_audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash BYTEA NOT NULL
);
INSERT INTO fk_audit_head (id, seq, hash) VALUES (1, 0, decode('0000000000000000000000000000000000000000000000000000000000000000', 'hex'));

-- fieldkey's own signing keys (Ed25519 seeds wrapped by the KMS).
CREATE TABLE fk_signing_keys (
    key_id     TEXT PRIMARY KEY,
    purpose    TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('active', 'retired')),
    public_key BYTEA NOT NULL,
    kms_key_id TEXT NOT NULL,
    wrapped    BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX fk_signing_keys_one_active ON fk_signing_keys (purpose) WHERE state = 'active';
