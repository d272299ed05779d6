-- Erasure (issue 6): erasure requests and their receipts, the audit chain the receipts
-- are chained into, and fieldkey's own signing keys (wrapped by the KMS).

-- Set in the transaction that shreds a tenant; rotation and subject-key creation
-- lock the tenant row and refuse once it is set, so nothing live appears afterwards.
ALTER TABLE fk_tenants ADD COLUMN erased_at INTEGER NULL;

CREATE TABLE fk_erasures (
    erasure_id    TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL,
    subject_id    TEXT NULL,              -- NULL: the whole tenant
    state         TEXT NOT NULL CHECK (state IN ('scheduled', 'executing', 'completed', 'cancelled')),
    requested_by  TEXT NOT NULL,
    requested_at  INTEGER NOT NULL,
    execute_after INTEGER NOT NULL,       -- end of the grace period
    started_at    INTEGER NULL,
    completed_at  INTEGER NULL,
    executed_by   TEXT NULL,
    cancelled_by  TEXT NULL,
    cancelled_at  INTEGER NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT NULL,
    receipt       TEXT NULL,              -- signed receipt (JSON), once completed
    audit_seq     INTEGER NULL,
    updated_at    INTEGER NOT NULL
);
-- at most one live (not cancelled) erasure per subject, and per tenant
CREATE UNIQUE INDEX fk_erasures_one_live ON fk_erasures (tenant_id, COALESCE(subject_id, ''))
    WHERE state <> 'cancelled';
CREATE INDEX fk_erasures_due ON fk_erasures (state, execute_after);

-- Append-only audit chain: each record holds the hash of the one before it.
CREATE TABLE fk_audit (
    seq           INTEGER PRIMARY KEY,
    ts            INTEGER NOT NULL,
    action        TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    actor         TEXT NOT NULL,
    tenant_id     TEXT NULL,
    caller_ip     TEXT NULL,              -- masked (/24, /48)
    details       TEXT NOT NULL,          -- JSON object
    prev_hash     BLOB NOT NULL,
    hash          BLOB NOT NULL
);
CREATE TRIGGER fk_audit_no_update BEFORE UPDATE ON fk_audit
BEGIN SELECT RAISE(ABORT, 'fk_audit is append-only'); END;
CREATE TRIGGER fk_audit_no_delete BEFORE DELETE ON fk_audit
BEGIN SELECT RAISE(ABORT, 'fk_audit is append-only'); END;
-- The head of the chain: its row lock serializes appends.
CREATE TABLE fk_audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash BLOB NOT NULL
);
INSERT INTO fk_audit_head (id, seq, hash) VALUES (1, 0, X'0000000000000000000000000000000000000000000000000000000000000000');

-- fieldkey's own signing keys (Ed25519 seeds wrapped by the KMS).
CREATE TABLE fk_signing_keys (
    key_id     TEXT PRIMARY KEY,
    purpose    TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('active', 'retired')),
    public_key BLOB NOT NULL,
    kms_key_id TEXT NOT NULL,
    wrapped    BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX fk_signing_keys_one_active ON fk_signing_keys (purpose) WHERE state = 'active';
