-- The job store's schema at commit 17c8c87 (before migrations): Base.metadata.create_all
-- output for sqlite, the 'previous schema' that tests/service/test_store_migrations.py upgrades.

CREATE TABLE jobs (
	seq INTEGER NOT NULL, 
	id VARCHAR(32) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	phase VARCHAR(16), 
	frames_done INTEGER NOT NULL, 
	frames_total INTEGER, 
	fps FLOAT, 
	eta_seconds FLOAT, 
	error_code VARCHAR(64), 
	error_message TEXT, 
	attempts INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	expires_at DATETIME, 
	expired BOOLEAN NOT NULL, 
	deleted BOOLEAN NOT NULL, 
	cancel_requested BOOLEAN NOT NULL, 
	source_kind VARCHAR(8) NOT NULL, 
	source_filename VARCHAR(255), 
	source_url TEXT, 
	source_bytes INTEGER, 
	input_ready BOOLEAN NOT NULL, 
	result_ext VARCHAR(8) NOT NULL, 
	options JSON NOT NULL, 
	stats JSON, 
	idempotency_key VARCHAR(255), 
	lease_owner VARCHAR(128), 
	lease_expires DATETIME, 
	revision INTEGER DEFAULT '0' NOT NULL, 
	owner_key VARCHAR(64), 
	webhook_url TEXT, 
	webhook_progress BOOLEAN DEFAULT 0 NOT NULL, 
	webhook_decile INTEGER DEFAULT '0' NOT NULL, 
	PRIMARY KEY (seq), 
	UNIQUE (idempotency_key)
);

CREATE INDEX ix_jobs_expires_at ON jobs (expires_at);

CREATE UNIQUE INDEX ix_jobs_id ON jobs (id);

CREATE INDEX ix_jobs_owner_key ON jobs (owner_key);

CREATE INDEX ix_jobs_status ON jobs (status);

CREATE TABLE webhook_events (
	id VARCHAR(40) NOT NULL, 
	job_id VARCHAR(32) NOT NULL, 
	type VARCHAR(32) NOT NULL, 
	url TEXT NOT NULL, 
	created_at DATETIME NOT NULL, 
	body TEXT, 
	state VARCHAR(12) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at DATETIME NOT NULL, 
	lease_owner VARCHAR(128), 
	lease_expires DATETIME, 
	last_error TEXT, 
	delivered_at DATETIME, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_webhook_events_job_id ON webhook_events (job_id);

CREATE INDEX ix_webhook_events_next_attempt_at ON webhook_events (next_attempt_at);

CREATE INDEX ix_webhook_events_state ON webhook_events (state);

CREATE TABLE workers (
	identity VARCHAR(128) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	threads INTEGER NOT NULL, 
	seen_at DATETIME NOT NULL, 
	PRIMARY KEY (identity)
);

CREATE INDEX ix_workers_seen_at ON workers (seen_at);
