-- Key epochs (issue 18; SQLite), docs/ERASURE.md §6): everything the key store wraps rides the
-- KMS key of an epoch; rolling to the next epoch rewraps live material only and then
-- schedules the old epoch key's deletion, so that a backup of this database outlives
-- no erasure by more than the backup horizon.

-- One row per epoch. Epoch 0 is the legacy wrapping key (the KMS default key that
-- wrapped material before the first roll); it exists only in stores migrated from
-- before epochs.
CREATE TABLE fk_epochs (
    epoch         INTEGER PRIMARY KEY CHECK (epoch >= 0),
    kms_key_id    TEXT NULL,             -- recorded as soon as the KMS made it (still 'creating')
    state         TEXT NOT NULL CHECK (state IN ('creating', 'active', 'retiring', 'sealed')),
    created_at    INTEGER NOT NULL,
    rolled_at     INTEGER NULL,           -- when its successor became active
    sealed_at     INTEGER NULL,           -- when its deletion was scheduled
    deletion_date INTEGER NULL,           -- when the KMS deletes it (Unix ms)
    kms_status    TEXT NULL,             -- what scheduling its deletion did
    updated_at    INTEGER NOT NULL,
    CHECK (state = 'creating' OR kms_key_id IS NOT NULL)
);
-- at most one epoch wraps new material
CREATE UNIQUE INDEX fk_epochs_one_active ON fk_epochs (state) WHERE state = 'active';

-- The roll's lease and progress (one row): one roller at a time across replicas.
CREATE TABLE fk_epoch_roll (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    owner       TEXT NULL,
    lease_until INTEGER NULL,
    target      INTEGER NULL,             -- epoch being rolled to
    progress    TEXT NOT NULL,           -- JSON counters
    updated_at  INTEGER NOT NULL
);
INSERT INTO fk_epoch_roll (id, owner, lease_until, target, progress, updated_at) VALUES (1, NULL, NULL, NULL, '{}', 0);

-- 1: the tenant brings its own KMS key (its versions stay under it); 0: its versions
-- ride the epoch key; NULL: not classified yet (a store from before epochs: the first
-- roll decides by comparing with the default key).
ALTER TABLE fk_tenants ADD COLUMN own_kms_key INTEGER NULL;
-- The epoch whose key wraps this version; NULL: the tenant's own key, or legacy.
ALTER TABLE fk_tenant_keys ADD COLUMN epoch INTEGER NULL;

-- Subject-wrapping keys: one random key per (tenant, epoch), wrapped by the epoch's KMS
-- key with encryption context {purpose: subject-wrapping-key, tenant, epoch}. Subject
-- keys are wrapped under them (locally, XAES-256-GCM), so rolling costs O(tenants) KMS
-- calls, not O(subjects). Deleted by the roll once no live subject needs them.
CREATE TABLE fk_subject_wrapping_keys (
    swk_id      TEXT PRIMARY KEY,        -- '<epoch>:<tenant>'
    tenant_id   TEXT NOT NULL REFERENCES fk_tenants (tenant_id),
    epoch       INTEGER NOT NULL REFERENCES fk_epochs (epoch),
    kms_key_id  TEXT NOT NULL,
    wrapped     BLOB NOT NULL,
    fingerprint BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    UNIQUE (tenant_id, epoch)
);
CREATE INDEX fk_subject_wrapping_keys_epoch ON fk_subject_wrapping_keys (epoch);
-- The SWK that wraps a subject key; NULL: legacy (wrapped under tenant version
-- wrap_version) or destroyed. The reference makes "no live subject under a deleted SWK"
-- a property of the database, not of the roll's code.
ALTER TABLE fk_subjects ADD COLUMN swk_id TEXT NULL REFERENCES fk_subject_wrapping_keys (swk_id);
CREATE INDEX fk_subjects_swk ON fk_subjects (swk_id);
CREATE INDEX fk_subjects_legacy ON fk_subjects (tenant_id) WHERE swk_id IS NULL AND state <> 'destroyed';

-- fieldkey's signing keys ride the epoch key too.
ALTER TABLE fk_signing_keys ADD COLUMN epoch INTEGER NULL;

-- The epoch that was active when an erasure destroyed the live keys: backups taken up
-- to then hold the material under that epoch's key (or an older one).
ALTER TABLE fk_erasures ADD COLUMN destroyed_epoch INTEGER NULL;
-- Signed "backups sealed" statements, one per sealed epoch key.
CREATE TABLE fk_epoch_seals (
    epoch      INTEGER PRIMARY KEY REFERENCES fk_epochs (epoch),
    statement  TEXT NOT NULL,            -- signed JSON
    audit_seq  INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
