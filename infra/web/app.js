// The forecast page: the API's own routes, drawn with the vendored Lightweight Charts (window.LightweightCharts).
"use strict";

const LWC = window.LightweightCharts;
const $ = (id) => document.getElementById(id);
const state = { drawn: false, candles: 0, expected: 0, reliability: { live: 0, backtest: 0 } };
window.candlecast = state; // read by the browser test

const priceChart = LWC.createChart($("chart"), {
  layout: { background: { type: "solid", color: "#ffffff" }, textColor: "#1d2330" },
  grid: { vertLines: { color: "#f0f2f5" }, horzLines: { color: "#f0f2f5" } },
  timeScale: { timeVisible: true, secondsVisible: false },
  rightPriceScale: { borderVisible: false },
});
const recentSeries = priceChart.addSeries(LWC.CandlestickSeries, {
  upColor: "#26a69a", downColor: "#ef5350", wickUpColor: "#26a69a", wickDownColor: "#ef5350", borderVisible: false,
});
const expectedSeries = priceChart.addSeries(LWC.CandlestickSeries, {
  upColor: "#ffb74d", downColor: "#ffb74d", wickUpColor: "#ffb74d", wickDownColor: "#ffb74d", borderVisible: false,
  priceLineVisible: false,
});
const band = (color, style) => priceChart.addSeries(LWC.LineSeries, {
  color, lineWidth: 1, lineStyle: style, priceLineVisible: false, lastValueVisible: false,
  crosshairMarkerVisible: false,
});
const bands = {
  upper_95: band("#90a4f5", LWC.LineStyle.Dashed), lower_95: band("#90a4f5", LWC.LineStyle.Dashed),
  upper_80: band("#2962ff", LWC.LineStyle.Solid), lower_80: band("#2962ff", LWC.LineStyle.Solid),
};

// Reliability: confidence on the horizontal axis (an options chart: numbers, not times), on a 0.01 grid.
const reliabilityChart = LWC.createOptionsChart($("reliability"), {
  layout: { background: { type: "solid", color: "#ffffff" }, textColor: "#1d2330" },
  grid: { vertLines: { visible: false }, horzLines: { color: "#f0f2f5" } },
  localization: { precision: 2, priceFormatter: (value) => value.toFixed(2) },
});
const diagonal = reliabilityChart.addSeries(LWC.LineSeries, {
  color: "#bdbdbd", lineWidth: 1, priceLineVisible: false, lastValueVisible: false, crosshairMarkerVisible: false,
});
const dots = (color) => reliabilityChart.addSeries(LWC.LineSeries, {
  color, lineVisible: false, pointMarkersVisible: true, pointMarkersRadius: 4, priceLineVisible: false,
  lastValueVisible: false,
});
const liveDots = dots("#e65100");
const backtestDots = dots("#455a64");
diagonal.setData(Array.from({ length: 101 }, (_, i) => ({ time: i / 100, value: i / 100 })));

const seconds = (iso) => Math.floor(Date.parse(iso) / 1000);
const escape = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) {
    // API Gateway's own answers (429 from a route's throttle) are {"message": ...}; ours are {"error": ...}.
    const reason = body.error ? `${body.error.code}: ${body.error.message}` : body.message || "";
    throw new Error(`HTTP ${response.status}${reason ? ` ${reason}` : ""}`);
  }
  return body;
}

function onGrid(bins) {
  // One point per 0.01 of confidence (the axis is a grid); bins that round together keep the larger.
  const points = new Map();
  for (const bin of bins || []) {
    const x = Math.round(bin.mean_confidence * 100) / 100;
    if (!points.has(x) || points.get(x).n < bin.n) points.set(x, { value: bin.observed, n: bin.n });
  }
  return [...points.entries()].sort((a, b) => a[0] - b[0]).map(([time, point]) => ({ time, value: point.value }));
}

const format = (value, digits = 3) => (value === null || value === undefined ? "—" : Number(value).toFixed(digits));

function showModel(record) {
  const live = record.live.n_scored > 0 || !record.replay ? record.live : record.replay;
  const liveName = live.in_sample ? "replay (in-sample)" : "live";
  $("live-label").textContent = liveName;
  $("live-head").textContent = liveName;
  const liveBins = onGrid(live.reliability);
  const backtestBins = onGrid(record.backtest.reliability);
  liveDots.setData(liveBins);
  backtestDots.setData(backtestBins);
  reliabilityChart.timeScale().fitContent();
  state.reliability = { live: liveBins.length, backtest: backtestBins.length };
  const rows = [
    ["steps scored", live.n_scored, record.backtest.n_pairs, 0],
    ["coverage 80 % (accuracy)", live.coverage_80, record.backtest.coverage_80],
    ["coverage 95 %", live.coverage_95, record.backtest.coverage_95],
    ["confidence ECE", live.ece, record.backtest.ece],
    ["pinball skill vs baseline", live.pinball_skill, record.backtest.pinball_skill],
  ];
  $("figures").querySelector("tbody").innerHTML = rows.map(([name, a, b, digits]) =>
    `<tr><td>${name}</td><td>${format(a, digits)}</td><td>${format(b, digits)}</td></tr>`).join("");
  $("model-title").textContent = `Model: ${record.model.name} ${record.model.version} (${record.model.kind})`;
  const period = live.period_start ? `Scored steps from ${live.period_start} to ${live.period_end}. ` : "";
  const drift = record.drift ? "Drift: live 80 % coverage has left [0.72, 0.88]. " : "";
  const sample = live.in_sample
    ? "These origins lie inside the model's training window, so they do not test it; live figures count only " +
      "predictions made after it."
    : "";
  $("model-note").textContent = drift + period + sample;
}

async function forecast(event) {
  event.preventDefault();
  const symbol = $("symbol").value.trim();
  const timeframe = $("timeframe").value;
  const status = $("status");
  status.className = "";
  status.textContent = "forecasting…";
  state.drawn = false;
  try {
    const prediction = await api("/predictions", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ symbol, timeframe }),
    });
    const [candles, record] = await Promise.all([
      api(`/local/candles?symbol=${encodeURIComponent(prediction.ticker)}&timeframe=${timeframe}&limit=120`),
      api(`/models/${timeframe}`),
    ]);
    recentSeries.setData(candles.candles);
    expectedSeries.setData(prediction.steps.map((step) => ({
      time: seconds(step.ts), open: step.open, high: step.high, low: step.low, close: step.close,
    })));
    for (const [name, series] of Object.entries(bands)) {
      series.setData(prediction.steps.map((step) => ({ time: seconds(step.ts), value: step[name] })));
    }
    priceChart.timeScale().fitContent();
    showModel(record);
    $("chart-title").textContent =
      `${prediction.ticker} ${timeframe}: ${candles.candles.length} recent candles and 30 expected from ` +
      `${prediction.last_candle_at}`;
    Object.assign(state, { drawn: true, candles: candles.candles.length, expected: prediction.steps.length });
    status.textContent = `prediction ${prediction.id}`;
  } catch (error) {
    status.className = "error";
    status.textContent = String(error.message || error);
  }
}

async function fillSymbols() {
  try {
    const top = await api("/symbols/top?limit=100");
    $("symbols").innerHTML = top.map((symbol) => `<option value="${escape(symbol.ticker)}">${escape(symbol.name)}</option>`).join("");
  } catch (error) {
    $("status").textContent = `symbols: ${error.message}`;
  }
}

$("controls").addEventListener("submit", forecast);
fillSymbols();
