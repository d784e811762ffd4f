-- The transcript positions the history worker put in a conversation's UCS document, frozen at
-- its first attempt (a retried write sends the same document): an entry that comes afterwards
-- is told apart from a redelivery of one in it. NULL: not written yet, or written before this
-- migration (nothing is then called late).
ALTER TABLE history_conversations ADD COLUMN written_json TEXT;
