-- Bots call the bot API (`/v1/bot/...`) with a token of their own: SHA-256 of it, like agent
-- tokens. NULL for bots created before this migration until their token is rotated.

ALTER TABLE bots ADD COLUMN token_hash TEXT;
CREATE UNIQUE INDEX bots_by_token ON bots (token_hash);
