-- fieldkey key store, SQLite. Wrapped key material only: nothing here is usable
-- without the KMS. Timestamps are Unix milliseconds (UTC).
CREATE TABLE fk_tenants (
    tenant_id   TEXT PRIMARY KEY,
    kms_key_id  TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE fk_tenant_keys (
    tenant_id    TEXT NOT NULL REFERENCES fk_tenants (tenant_id),
    version      INTEGER NOT NULL CHECK (version >= 1 AND version <= 4294967295),
    state        TEXT NOT NULL CHECK (state IN ('active', 'decrypt-only', 'suspended', 'destroyed')),
    resume_state TEXT NULL CHECK (resume_state IN ('active', 'decrypt-only')),
    kms_key_id   TEXT NOT NULL,
    wrapped      BLOB NULL,
    fingerprint  BLOB NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, version),
    -- a destroyed version keeps its row (tombstone) but never its material
    CHECK ((state = 'destroyed') = (wrapped IS NULL))
);
-- at most one version of a tenant encrypts new data
CREATE UNIQUE INDEX fk_tenant_keys_one_active ON fk_tenant_keys (tenant_id) WHERE state = 'active';

CREATE TABLE fk_subjects (
    tenant_id    TEXT NOT NULL REFERENCES fk_tenants (tenant_id),
    subject_id   TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('active', 'suspended', 'destroyed')),
    wrap_version INTEGER NOT NULL,
    wrapped      BLOB NULL,
    fingerprint  BLOB NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, subject_id),
    CHECK ((state = 'destroyed') = (wrapped IS NULL))
);
