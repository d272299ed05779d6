-- Rotation (issue 5): a 'retired' key-version state, and re-encryption jobs.
-- Retired, like destroyed, keeps the row and never the material.
ALTER TABLE fk_tenant_keys DROP CONSTRAINT fk_tenant_keys_state_check;
ALTER TABLE fk_tenant_keys ADD CONSTRAINT fk_tenant_keys_state_check
    CHECK (state IN ('active', 'decrypt-only', 'suspended', 'destroyed', 'retired'));
ALTER TABLE fk_tenant_keys DROP CONSTRAINT fk_tenant_keys_check;
ALTER TABLE fk_tenant_keys ADD CONSTRAINT fk_tenant_keys_material_check
    CHECK ((state IN ('destroyed', 'retired')) = (wrapped IS NULL));

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
    lease_until BIGINT NULL,
    checkpoint  TEXT NULL,              -- last primary key fully processed (text form)
    progress    TEXT NOT NULL,          -- JSON counters
    error       TEXT NULL,
    created_at  BIGINT NOT NULL,
    started_at  BIGINT NULL,
    updated_at  BIGINT NOT NULL,
    finished_at BIGINT NULL
);
