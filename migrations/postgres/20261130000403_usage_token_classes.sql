-- Token classes and the numbers' source on each usage row. The classes are counted
-- within prompt_tokens / completion_tokens as OpenAI counts them (cached input and
-- cache writes within the prompt, reasoning within the completion), so totals keep
-- their meaning. `source` says where the numbers came from: 'reported' (stated to
-- /v1/report), 'parsed' (read from the upstream's answer) or 'estimated' (the
-- admission's estimate was charged). Rows written before this release keep the
-- defaults, which is what they were: reported, with no classes known.
ALTER TABLE usage_records ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN reasoning_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN source TEXT NOT NULL DEFAULT 'reported';
