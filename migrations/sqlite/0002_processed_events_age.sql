-- Old event records are pruned by age (WeChat retries within seconds).
CREATE INDEX processed_events_created_at ON processed_events (created_at);
