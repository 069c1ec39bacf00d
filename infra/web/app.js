// The forecast page: the API's own routes, drawn with the vendored Lightweight Charts (window.LightweightCharts).
"use strict";

const LWC = window.LightweightCharts;
const $ = (id) => document.getElementById(id);
const state = { drawn: false, candles: 0, expected: 0, reliability: { live: 0, backtest: 0 }, priceScaleMode: null };
window.candlecast = state; // read by the browser test
// An API Gateway 429 carries no Retry-After: wait a throttled route's refill (1/rate, 5 s at most by default).
const DEFAULT_RETRY_SECONDS = 5;
// A request unanswered after API Gateway's own integration limit (30 s) will not be answered: it is given up, so
// a hung API cannot leave the page "forecasting…" for ever.
const REQUEST_TIMEOUT_SECONDS = 30;

// Every line, outline and point a reader needs is 3:1 at least against the white chart (WCAG 2.1 SC 1.4.11): the recent
// up candles 4.3:1 (the library's #26a69a was 3.0:1), the expected candles' outlines and wicks 4.2:1 around their pale
// bodies (which alone were 1.7:1), the 80 % band 4.9:1, the 95 % band 3.5:1 and dashed (#90a4f5 was 2.4:1), the
// diagonal 4.5:1 (#bdbdbd was 1.9:1), the crosshair 4.2:1 (the library's #9598a1 was 2.9:1). The faint grid is not
// needed to read a value: the axes' labels and the crosshair's are.
const COLOURS = {
  up: "#00897b", down: "#ef5350", expectedBody: "#ffb74d", expectedEdge: "#b26a00",
  band80: "#2962ff", band95: "#7986cb", diagonal: "#767676", live: "#e65100", backtest: "#455a64", crosshair: "#787b86",
};
const crosshair = { vertLine: { color: COLOURS.crosshair }, horzLine: { color: COLOURS.crosshair } };
// No TradingView logo link inside the charts: a chart is an image (role="img") whose children a screen reader does not
// see, so the keyboard's Tab would land on a link nothing announces. The page's footer credits TradingView, with the
// library's NOTICE and a link to https://www.tradingview.com/, which its licence asks for in the logo's stead.
const layout = { background: { type: "solid", color: "#ffffff" }, textColor: "#1d2330", attributionLogo: false };

// autoSize: each chart follows its box (a ResizeObserver), so a narrowed window narrows the chart with it.
const priceChart = LWC.createChart($("chart"), {
  autoSize: true,
  layout,
  crosshair,
  grid: { vertLines: { color: "#f0f2f5" }, horzLines: { color: "#f0f2f5" } },
  // A resize keeps the times in view (the 120 candles and the 30 expected), squeezing or spreading the bars.
  timeScale: { timeVisible: true, secondsVisible: false, lockVisibleTimeRangeOnResize: true },
  // Logarithmic, at every timeframe: the bands are ratios of the price (at 1w and 1m the 95 % band reaches
  // 100x to 10,000x it), which a linear axis squeezes the candles under, past zero; on a log axis equal
  // ratios are equal distances, so the candles keep their shape and a band's width reads as a multiple.
  rightPriceScale: { borderVisible: false, mode: LWC.PriceScaleMode.Logarithmic },
});
priceChart.timeScale().subscribeVisibleLogicalRangeChange((range) => {
  state.visibleRange = range && { from: range.from, to: range.to }; // bar indices in view, for the browser test
});
const recentSeries = priceChart.addSeries(LWC.CandlestickSeries, {
  upColor: COLOURS.up, downColor: COLOURS.down, wickUpColor: COLOURS.up, wickDownColor: COLOURS.down,
  borderVisible: false,
});
// Pale bodies, set apart from the recent candles, inside dark outlines (a bar too narrow for both is all outline).
const expectedSeries = priceChart.addSeries(LWC.CandlestickSeries, {
  upColor: COLOURS.expectedBody, downColor: COLOURS.expectedBody, borderVisible: true,
  borderUpColor: COLOURS.expectedEdge, borderDownColor: COLOURS.expectedEdge,
  wickUpColor: COLOURS.expectedEdge, wickDownColor: COLOURS.expectedEdge, priceLineVisible: false,
});
const band = (color, style) => priceChart.addSeries(LWC.LineSeries, {
  color, lineWidth: 1, lineStyle: style, priceLineVisible: false, lastValueVisible: false,
  crosshairMarkerVisible: false,
});
const bands = {
  // Told apart by their dashes as well as their shades.
  upper_95: band(COLOURS.band95, LWC.LineStyle.Dashed), lower_95: band(COLOURS.band95, LWC.LineStyle.Dashed),
  upper_80: band(COLOURS.band80, LWC.LineStyle.Solid), lower_80: band(COLOURS.band80, LWC.LineStyle.Solid),
};

// Reliability: confidence on the horizontal axis (an options chart: numbers, not times), on a 0.01 grid.
const reliabilityChart = LWC.createOptionsChart($("reliability"), {
  autoSize: true,
  layout,
  grid: { vertLines: { visible: false }, horzLines: { color: "#f0f2f5" } },
  crosshair,
  localization: { precision: 2, priceFormatter: (value) => value.toFixed(2) },
  timeScale: { lockVisibleTimeRangeOnResize: true },
});
const diagonal = reliabilityChart.addSeries(LWC.LineSeries, {
  color: COLOURS.diagonal, lineWidth: 1, lineStyle: LWC.LineStyle.Dashed, priceLineVisible: false,
  lastValueVisible: false, crosshairMarkerVisible: false,
});
const dots = (color) => reliabilityChart.addSeries(LWC.LineSeries, {
  color, lineVisible: false, pointMarkersVisible: true, pointMarkersRadius: 4, priceLineVisible: false,
  lastValueVisible: false,
});
const liveDots = dots(COLOURS.live);
const backtestDots = dots(COLOURS.backtest);
diagonal.setData(Array.from({ length: 101 }, (_, i) => ({ time: i / 100, value: i / 100 })));
// The axis runs a little past 0 and 1 (in 0.01 steps, the diagonal's points): at the edges their labels were cut.
const showConfidenceAxis = () => reliabilityChart.timeScale().setVisibleLogicalRange({ from: -8, to: 108 });
showConfidenceAxis();

// Prices from 0.00001 to 100,000: each label keeps up to PRICE_DIGITS significant digits (two decimals at least,
// no trailing zeros past them, thousands grouped), so 0.0036 is not "0.00"; the axis' step (minMove) follows the last close's magnitude, or a
// price under a cent gets no ticks at all.
const PRICE_DIGITS = 5;
const MAX_DECIMALS = 12;
const decimalsFor = (price) => (Number.isFinite(price) && price > 0
  ? Math.min(MAX_DECIMALS, Math.max(2, PRICE_DIGITS - 1 - Math.floor(Math.log10(price)))) : 2);
const priceFormats = new Map();
function formatPrice(price) {
  const decimals = decimalsFor(Math.abs(price));
  if (!priceFormats.has(decimals)) {
    priceFormats.set(decimals, new Intl.NumberFormat("en-US",
      { minimumFractionDigits: 2, maximumFractionDigits: decimals }));
  }
  return priceFormats.get(decimals).format(price);
}
function priceFormatFor(lastClose) {
  return { type: "custom", formatter: formatPrice, minMove: 10 ** -decimalsFor(lastClose) };
}
const priceSeries = [recentSeries, expectedSeries, ...Object.values(bands)];

const seconds = (iso) => Math.floor(Date.parse(iso) / 1000);
const escape = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

class ApiError extends Error {
  constructor(message, status, retryAfter, code) {
    super(message);
    Object.assign(this, { status, retryAfter, code });
  }
}

async function api(path, options) {
  const route = `${options?.method || "GET"} ${path.split("?")[0]}`;
  const timeout = AbortSignal.timeout(REQUEST_TIMEOUT_SECONDS * 1000);
  const signal = options?.signal ? AbortSignal.any([options.signal, timeout]) : timeout;
  let response;
  let text;
  try {
    response = await fetch(path, { ...options, signal });
    // Any body may be something other than JSON (a proxy's or a captive portal's HTML page).
    text = await response.text();
  } catch (error) {
    if (timeout.aborted && !options?.signal?.aborted) {
      // A POST given up on may still finish on the server: say so, as the answer never told.
      const maybeStored = options?.method === "POST" ? " It may still have been stored." : "";
      throw new ApiError(`${route} got no answer in ${REQUEST_TIMEOUT_SECONDS} s: the API is slow or down.` +
        `${maybeStored} Try again.`, undefined);
    }
    // fetch's TypeError ("Failed to fetch"): no answer at all (offline, DNS, a refused connection, CORS).
    if (error instanceof TypeError) throw new ApiError(`could not reach the API (${route})`, undefined);
    throw error;
  }
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = undefined;
  }
  if (response.ok) {
    if (body === undefined) {
      const type = (response.headers.get("content-type") || "no Content-Type").split(";")[0];
      throw new ApiError(`${route} answered HTTP ${response.status} with a body that is not JSON (${type})`,
        response.status);
    }
    return body;
  }
  // The status first: an error body says why only when it is ours, {"error": ...}, or API Gateway's own (its
  // 429 from a route's throttle), {"message": ...}.
  const reason = body?.error ? `${body.error.code}: ${body.error.message}` : body?.message || "";
  if (response.status === 429) {
    const seconds = Number.parseInt(response.headers.get("retry-after") || "", 10);
    const wait = Number.isFinite(seconds) && seconds > 0 ? seconds : DEFAULT_RETRY_SECONDS;
    throw new ApiError(`Too many requests: the API's throttle turned ${route} away and nothing was done. ` +
      `Try again in ${wait} s.`, 429, wait);
  }
  throw new ApiError(`HTTP ${response.status}${reason ? ` ${reason}` : ` ${response.statusText}`}`.trimEnd(),
    response.status, undefined, body?.error?.code);
}

// A timeframe's model and track record, once per page load (the model changes only on a deploy); a failed
// fetch is forgotten, so the next Forecast asks again.
const models = new Map();
function modelFor(timeframe) {
  if (!models.has(timeframe)) {
    models.set(timeframe, api(`/models/${timeframe}`).catch((error) => {
      models.delete(timeframe);
      throw error;
    }));
  }
  return models.get(timeframe);
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
  showConfidenceAxis();
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
  const said = (name, points) => `${name}: ` + (points.length
    ? points.map((point) => `${point.time.toFixed(2)} stated, ${point.value.toFixed(2)} happened`).join("; ")
    : "no points");
  $("reliability").setAttribute("aria-label", `Reliability of ${record.model.name} ${record.model.version}, ` +
    "stated confidence against how often the event happened (perfect on the diagonal). " +
    `${said(liveName, liveBins)}. ${said("backtest", backtestBins)}.`);
  const period = live.period_start ? `Scored steps from ${live.period_start} to ${live.period_end}. ` : "";
  const drift = record.drift ? "Drift: live 80 % coverage has left [0.72, 0.88]. " : "";
  const sample = live.in_sample
    ? "These origins lie inside the model's training window, so they do not test it; live figures count only " +
      "predictions made after it."
    : "";
  $("model-note").textContent = drift + period + sample;
}

// What GET /symbols/top says of each symbol: the timeframes with stored candles (candle_timeframes), and whether
// others are fetched from Polygon (fetchable). Without a key, only the stored ones can be forecast.
const symbolInfo = new Map();
// The API's own normalisation (candlecast.tickers): x:eth-usd, ETH/USD and ETHUSD all name X:ETHUSD.
const canonical = (raw) => `X:${raw.trim().toUpperCase().replace(/^X:/, "").replace(/[-/_]/g, "")}`;
const timeframeSelect = $("timeframe");
const TIMEFRAME_NAMES = new Map([...timeframeSelect.options].map((option) => [option.value, option.textContent]));

function availableTimeframes(info) {
  return info && !info.fetchable ? info.candle_timeframes : null; // null: every timeframe may be asked for
}

function showTimeframes() {
  // The symbol's timeframes without candles are disabled (and say so); a disabled choice moves to the first one
  // that has them.
  const symbol = canonical($("symbol").value);
  const available = availableTimeframes(symbolInfo.get(symbol));
  for (const option of timeframeSelect.options) {
    const missing = available !== null && !available.includes(option.value);
    option.disabled = missing;
    option.textContent = TIMEFRAME_NAMES.get(option.value) + (missing ? " (no candles)" : "");
  }
  if (timeframeSelect.selectedOptions[0]?.disabled) {
    const first = [...timeframeSelect.options].find((option) => !option.disabled);
    if (first) timeframeSelect.value = first.value;
  }
}

async function unavailableMessage(symbol, timeframe, error) {
  // A forecast refused for want of candles names the timeframes this symbol has (asking the API when the symbol
  // is not in the list).
  let info = symbolInfo.get(canonical(symbol));
  if (!info) {
    try {
      info = await api(`/symbols/${encodeURIComponent(symbol)}`);
    } catch {
      return error.message;
    }
  }
  const stored = info.candle_timeframes || [];
  return `${info.ticker} has no ${timeframe} candles here` +
    (stored.length ? `; it can be forecast at ${stored.join(", ")}` : "; it has no stored candles at any timeframe") +
    ` (${error.message})`;
}

const CHART_TITLE = $("chart-title").textContent;
const MODEL_TITLE = $("model-title").textContent;
// The charts' names for a screen reader (role="img"): what they show, in words and numbers.
const CHART_NAMES = new Map(["chart", "reliability"].map((id) => [id, $(id).getAttribute("aria-label")]));

function clearForecast() {
  // Nothing of an earlier forecast stays on screen under a failed one's message.
  recentSeries.setData([]);
  expectedSeries.setData([]);
  for (const series of Object.values(bands)) series.setData([]);
  liveDots.setData([]);
  backtestDots.setData([]);
  $("chart-title").textContent = CHART_TITLE;
  $("model-title").textContent = MODEL_TITLE;
  for (const [id, name] of CHART_NAMES) $(id).setAttribute("aria-label", name);
  $("figures").querySelector("tbody").innerHTML = "";
  $("model-note").textContent = "";
  Object.assign(state, { drawn: false, candles: 0, expected: 0, reliability: { live: 0, backtest: 0 } });
}

const button = $("forecast");
const FORECAST_LABEL = button.textContent;

let holdTimer = null;

// A focused button that disables itself drops the focus to <body>, where the next Tab starts from the page's top: the
// status line, which says why it is disabled, holds the focus meanwhile and gives it back, unless the user moved it.
let focusLent = false;
function setDisabled(disabled) {
  const status = $("status");
  if (disabled && document.activeElement === button) {
    focusLent = true;
    status.focus();
  }
  button.disabled = disabled;
  if (!disabled && focusLent) {
    focusLent = false;
    if (document.activeElement === status || document.activeElement === document.body) button.focus();
  }
}

function showBusy(busy) {
  clearTimeout(holdTimer);
  setDisabled(busy);
  button.setAttribute("aria-busy", String(busy));
  button.textContent = busy ? "Forecasting…" : FORECAST_LABEL;
}

function holdOff(seconds) {
  // After a 429 the button waits out the throttle's refill, counting down.
  clearTimeout(holdTimer);
  button.setAttribute("aria-busy", "false");
  setDisabled(true);
  let left = seconds;
  const tick = () => {
    if (left <= 0) {
      setDisabled(false);
      button.textContent = FORECAST_LABEL;
      return;
    }
    button.textContent = `${FORECAST_LABEL} (${left} s)`;
    left -= 1;
    holdTimer = setTimeout(tick, 1000);
  };
  tick();
}

// The forecast in flight: a new one aborts it, so only the latest request's answer is drawn.
let inFlight = null;

async function forecast(event) {
  event.preventDefault();
  inFlight?.abort();
  const request = new AbortController();
  inFlight = request;
  const { signal } = request;
  const symbol = $("symbol").value.trim();
  const timeframe = $("timeframe").value;
  const status = $("status");
  status.className = "";
  status.textContent = "forecasting…";
  state.drawn = false;
  showBusy(true);
  let created = null;
  try {
    // Everything is fetched before anything is drawn; the model first, so that a refused model read leaves
    // no prediction behind that the page never showed. The model's read is shared, so it is not aborted.
    const record = await modelFor(timeframe);
    signal.throwIfAborted();
    const prediction = await api("/predictions", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ symbol, timeframe }),
      signal,
    });
    created = prediction.id;
    const candles = await api(
      `/local/candles?symbol=${encodeURIComponent(prediction.ticker)}&timeframe=${timeframe}&limit=120`, { signal });
    signal.throwIfAborted();
    const lastClose = candles.candles.at(-1)?.close ?? prediction.steps[0]?.close;
    const priceFormat = priceFormatFor(lastClose);
    for (const series of priceSeries) series.applyOptions({ priceFormat });
    recentSeries.setData(candles.candles);
    expectedSeries.setData(prediction.steps.map((step) => ({
      time: seconds(step.ts), open: step.open, high: step.high, low: step.low, close: step.close,
    })));
    for (const [name, series] of Object.entries(bands)) {
      series.setData(prediction.steps.map((step) => ({ time: seconds(step.ts), value: step[name] })));
    }
    // Times of day only where bars have them; every time is UTC (the chart's title says so).
    priceChart.applyOptions({ timeScale: { timeVisible: timeframe === "1h" || timeframe === "4h" } });
    priceChart.timeScale().fitContent();
    showModel(record);
    $("chart-title").textContent =
      `${prediction.ticker} ${timeframe} (UTC): ${candles.candles.length} recent candles and 30 expected from ` +
      `${prediction.last_candle_at}` +
      (prediction.stale ? ` (stale: ${prediction.data_age_bars} newer candles had closed when it was made)` : "");
    const last = prediction.steps.at(-1);
    $("chart").setAttribute("aria-label", `${prediction.ticker} ${timeframe} candles, times UTC, on a logarithmic ` +
      `price axis: ${candles.candles.length} recent candles to ${prediction.last_candle_at}, last close ` +
      `${formatPrice(lastClose)}; ${prediction.steps.length} expected candles to ${last.ts}, at the last a median ` +
      `close of ${formatPrice(last.close)}, an 80 % band from ${formatPrice(last.lower_80)} to ` +
      `${formatPrice(last.upper_80)} and a 95 % band from ${formatPrice(last.lower_95)} to ${formatPrice(last.upper_95)}.`);
    Object.assign(state, {
      drawn: true, candles: candles.candles.length, expected: prediction.steps.length,
      priceScaleMode: priceChart.priceScale("right").options().mode,
      lastClose, priceLabel: recentSeries.priceFormatter().format(lastClose),
    });
    status.textContent = `prediction ${prediction.id}`;
    showBusy(false);
  } catch (error) {
    if (signal.aborted) return; // a later forecast owns the page
    const message = error.code === "candles_unavailable"
      ? await unavailableMessage(symbol, timeframe, error) : String(error.message || error);
    if (signal.aborted) return;
    clearForecast();
    status.className = "error";
    status.textContent = created ? `prediction ${created} was stored but cannot be drawn: ${message}` : message;
    if (error.status === 429) holdOff(error.retryAfter);
    else showBusy(false);
  } finally {
    if (inFlight === request) inFlight = null;
  }
}

// A failed symbol list (a 429, a 503) is asked for again after the wait it names, or 5 s, with the wait on screen.
async function fillSymbols() {
  const status = $("status");
  try {
    const top = await api("/symbols/top?limit=100");
    for (const symbol of top) symbolInfo.set(symbol.ticker, symbol);
    showTimeframes();
    $("symbols").innerHTML = top.map((symbol) => `<option value="${escape(symbol.ticker)}">${escape(symbol.name)}</option>`).join("");
    if (status.dataset.symbols) Object.assign(status, { className: "", textContent: "" });
    delete status.dataset.symbols;
  } catch (error) {
    const wait = error.retryAfter || DEFAULT_RETRY_SECONDS;
    status.className = "error";
    status.dataset.symbols = "failed";
    status.textContent = `symbols: ${error.message} Asking again in ${wait} s.`;
    setTimeout(fillSymbols, wait * 1000);
  }
}

$("controls").addEventListener("submit", forecast);
$("symbol").addEventListener("input", showTimeframes);
fillSymbols();
