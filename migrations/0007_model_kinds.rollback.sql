-- The old labels: a GARCH-scale file was registered as 'baseline', a combination as 'learned'.
ALTER TABLE models DROP CONSTRAINT models_kind_check;
UPDATE models SET kind = CASE kind WHEN 'garch-scale' THEN 'baseline' ELSE 'learned' END
    WHERE kind IN ('garch-scale', 'combined');
ALTER TABLE models ADD CONSTRAINT models_kind_check CHECK (kind IN ('baseline', 'learned'));
