DROP TABLE symbols;
