-- depends: 0006_score_due
-- A model's kind is the method it ships: the GARCH-scale model and the combination of a model with it are
-- kinds of their own, not 'baseline' and 'learned'.
ALTER TABLE models DROP CONSTRAINT models_kind_check;
ALTER TABLE models ADD CONSTRAINT models_kind_check
    CHECK (kind IN ('baseline', 'learned', 'garch-scale', 'combined'));
-- Re-applied after a rollback, which relabelled these: each registered row's metrics still name what it shipped.
UPDATE models SET kind = metrics->>'shipped'
    WHERE kind IN ('baseline', 'learned') AND metrics->>'shipped' IN ('garch-scale', 'combined');
