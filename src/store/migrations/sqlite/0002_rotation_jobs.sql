-- Rotation (issue 5): a 'retired' key-version state, and re-encryption jobs.
--
-- SQLite cannot alter a CHECK constraint, so fk_tenant_keys is rebuilt (nothing
-- references it). Retired, like destroyed, keeps the row and never the material.
CREATE TABLE fk_tenant_keys_new (
    tenant_id    TEXT NOT NULL REFERENCES fk_tenants (tenant_id),
    version      INTEGER NOT NULL CHECK (version >= 1 AND version <= 4294967295),
    state        TEXT NOT NULL CHECK (state IN ('active', 'decrypt-only', 'suspended', 'destroyed', 'retired')),
    resume_state TEXT NULL CHECK (resume_state IN ('active', 'decrypt-only')),
    kms_key_id   TEXT NOT NULL,
    wrapped      BLOB NULL,
    fingerprint  BLOB NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, version),
    CHECK ((state IN ('destroyed', 'retired')) = (wrapped IS NULL))
);
INSERT INTO fk_tenant_keys_new SELECT * FROM fk_tenant_keys;
DROP TABLE fk_tenant_keys;
ALTER TABLE fk_tenant_keys_new RENAME TO fk_tenant_keys;
CREATE UNIQUE INDEX fk_tenant_keys_one_active ON fk_tenant_keys (tenant_id) WHERE state = 'active';

CREATE INDEX fk_subjects_wrap_version ON fk_subjects (tenant_id, wrap_version);

-- One row per re-encryption job. The runner holding the lease (owner, lease_until) is
-- the only one that advances it; control is how operators pause or cancel it.
CREATE TABLE fk_jobs (
    job_id      TEXT PRIMARY KEY,
    target      TEXT NOT NULL,          -- the table it re-encrypts (schema.table)
    tenant_id   TEXT NULL,              -- NULL: every tenant in that table
    spec        TEXT NOT NULL,          -- JSON job spec
    state       TEXT NOT NULL CHECK (state IN ('pending', 'running', 'paused', 'completed', 'cancelled', 'failed')),
    control     TEXT NOT NULL CHECK (control IN ('run', 'pause', 'cancel')),
    owner       TEXT NULL,
    lease_until INTEGER NULL,
    checkpoint  TEXT NULL,              -- last primary key fully processed (text form)
    progress    TEXT NOT NULL,          -- JSON counters
    error       TEXT NULL,
    created_at  INTEGER NOT NULL,
    started_at  INTEGER NULL,
    updated_at  INTEGER NOT NULL,
    finished_at INTEGER NULL
);
