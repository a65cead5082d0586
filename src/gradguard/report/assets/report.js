/* gradguard report: linked charts (uPlot), the per-layer heatmap, findings on the charts.
 * Reads the page's JSON data block; fetches nothing, evaluates nothing, and writes user
 * strings only through textContent or onto a canvas. */
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("gg-data").textContent);
  var X = DATA.x, XE = DATA.x_end, RUNS = DATA.runs, N = X.length;
  var MULTI = RUNS.length > 1;
  var PALETTE = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#be185d", "#65a30d", "#78716c"];
  var FULL = N ? [X[0], XE[N - 1]] : [0, 1];
  if (FULL[1] <= FULL[0]) FULL = [FULL[0] - 1, FULL[0] + 1];
  var SYNC = uPlot.sync("gradguard");
  var api = (window.gradguardReport = { charts: {}, highlight: null, view: null, ready: false, renderMs: null });
  var charts = api.charts;
  var syncing = false;
  var smoothing = 0.6;
  var PX = window.devicePixelRatio || 1;

  // ---------------------------------------------------------------- helpers
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text != null) node.textContent = text;
    return node;
  }
  function colour(i) { return PALETTE[i % PALETTE.length]; }
  function alpha(hex, a) {
    var n = parseInt(hex.slice(1), 16);
    return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + a + ")";
  }
  function fmt(v) {
    if (v == null) return "–";
    if (!isFinite(v)) return isNaN(v) ? "NaN" : v > 0 ? "inf" : "-inf";
    var a = Math.abs(v);
    if (v === 0 || (a >= 1e-3 && a < 1e5)) return String(Number(v.toPrecision(4)));
    return v.toExponential(2);
  }
  function fmtStep(v) {
    var a = Math.abs(v);
    if (a >= 1e6) return Number((v / 1e6).toPrecision(4)) + "M";
    if (a >= 1e4) return Number((v / 1e3).toPrecision(4)) + "k";
    return String(Math.round(v));
  }
  function stepLabel(i) { return X[i] === XE[i] ? "step " + X[i] : "steps " + X[i] + "–" + XE[i]; }
  function isPow10(v) { var l = Math.log10(v); return Math.abs(l - Math.round(l)) < 1e-9; }
  function positive(arr) { return arr.map(function (v) { return v != null && v > 0 ? v : null; }); }
  function prefix(r) { return MULTI ? r.label + " · " : ""; }
  function finiteValues(arrays) {
    var out = [];
    arrays.forEach(function (a) { if (a) a.forEach(function (v) { if (v != null) out.push(v); }); });
    return out;
  }
  function wantsLog(arrays) {
    var v = finiteValues(arrays);
    if (!v.length) return false;
    var lo = Infinity, hi = -Infinity;
    v.forEach(function (x) { if (x < lo) lo = x; if (x > hi) hi = x; });
    return lo > 0 && hi / lo > 100;
  }
  function ema(values, w) {
    var out = new Array(values.length), last = 0, n = 0;
    for (var i = 0; i < values.length; i++) {
      var v = values[i];
      if (v == null) { out[i] = null; continue; }
      last = last * w + (1 - w) * v; n++;
      out[i] = last / (1 - Math.pow(w, n));
    }
    return out;
  }
  function rangeValue(lo, hi) {
    return function (u, v, si, idx) {
      if (v == null || idx == null) return "–";
      var a = lo[idx], b = hi[idx];
      return fmt(v) + (a != null && b != null && a !== b ? " [" + fmt(a) + " – " + fmt(b) + "]" : "");
    };
  }
  function plainValue(u, v) { return v == null ? "–" : fmt(v); }
  function pctValue(u, v) { return v == null ? "–" : (100 * v).toPrecision(3) + "%"; }

  // ---------------------------------------------------------------- shared x axis
  function xRange() { return api.view ? api.view.slice() : FULL.slice(); }
  function onScale(u, key) {
    if (key !== "x" || syncing) return;
    var mn = u.scales.x.min, mx = u.scales.x.max;
    if (mn == null || mx == null) return;
    api.view = mn <= FULL[0] && mx >= FULL[1] ? null : [mn, mx];
    syncing = true;
    try {
      Object.keys(charts).forEach(function (k) {
        var c = charts[k];
        if (c !== u && (c.scales.x.min !== mn || c.scales.x.max !== mx)) c.setScale("x", { min: mn, max: mx });
      });
      drawHeatmap();
    } finally {
      syncing = false;
    }
  }
  function follow(u) {
    // a chart made while zoomed (a log toggle, another layer) starts at the current zoom
    if (!api.view) return;
    syncing = true;
    try { u.setScale("x", { min: api.view[0], max: api.view[1] }); } finally { syncing = false; }
  }
  function zoomTo(mn, mx) {
    api.view = mn <= FULL[0] && mx >= FULL[1] ? null : [mn, mx];
    syncing = true;
    try {
      Object.keys(charts).forEach(function (k) { charts[k].setScale("x", { min: mn, max: mx }); });
    } finally {
      syncing = false;
    }
    drawHeatmap();
  }

  // ---------------------------------------------------------------- overlays
  function vline(ctx, u, x, style, width, dash) {
    var b = u.bbox;
    ctx.strokeStyle = style; ctx.lineWidth = width * PX; ctx.setLineDash(dash || []);
    ctx.beginPath(); ctx.moveTo(x, b.top); ctx.lineTo(x, b.top + b.height); ctx.stroke();
  }
  function drawOverlays(spec) {
    return function (u) {
      var ctx = u.ctx, b = u.bbox, right = b.left + b.width;
      ctx.save();
      ctx.beginPath(); ctx.rect(b.left, b.top, b.width, b.height); ctx.clip();
      ctx.font = 11 * PX + "px system-ui, sans-serif";
      var line = 0;
      RUNS.forEach(function (r, ri) {
        if (r.lost_at == null) return;
        var x0 = Math.max(u.valToPos(r.lost_at, "x", true), b.left);
        if (x0 >= right) return;
        ctx.fillStyle = "rgba(198,40,40,0.08)";
        ctx.fillRect(x0, b.top, right - x0, b.height);
        vline(ctx, u, x0, "rgba(183,28,28,0.9)", 1.5, [5 * PX, 3 * PX]);
        ctx.fillStyle = "#b71c1c";
        ctx.fillText(prefix(r) + "lost at step " + r.lost_at, x0 + 5 * PX, b.top + (13 + 13 * line++) * PX);
      });
      if (spec.marks) {
        RUNS.forEach(function (r, ri) {
          var s = r.series;
          var skipColour = MULTI ? colour(ri) : "#8e0018";
          s.skip_steps.forEach(function (step) {
            vline(ctx, u, u.valToPos(step, "x", true), alpha(skipColour, 0.75), 1.2, [3 * PX, 3 * PX]);
          });
          s.nonfinite_steps.forEach(function (step) {
            var x = u.valToPos(step, "x", true);
            ctx.fillStyle = "#d50000";
            ctx.fillRect(x - 1.5 * PX, b.top, 3 * PX, 7 * PX);
          });
        });
      }
      var h = api.highlight;
      if (h) {
        var a = u.valToPos(h.start, "x", true), z = u.valToPos(h.end, "x", true);
        if (z - a < 6 * PX) { var mid = (a + z) / 2; a = mid - 3 * PX; z = mid + 3 * PX; }
        ctx.fillStyle = "rgba(242,183,5,0.30)";
        ctx.fillRect(a, b.top, z - a, b.height);
        vline(ctx, u, a, "rgba(196,140,0,0.9)", 1);
        vline(ctx, u, z, "rgba(196,140,0,0.9)", 1);
      }
      ctx.restore();
    };
  }

  // ---------------------------------------------------------------- charts
  function yScale(log, base) { return log ? { distr: 3, log: base || 10 } : { distr: 1 }; }
  function tick(v) {
    var a = Math.abs(v);
    if (v !== 0 && (a < 1e-3 || a >= 1e5) && isPow10(a)) return (v < 0 ? "-" : "") + "1e" + Math.round(Math.log10(a));
    return fmt(v);
  }
  function yTicks(log) {
    return function (u, splits) {
      if (!log) return splits.map(tick);
      // few decades in view: label 1, 2 and 5 of each; many: the powers of ten only
      var decades = splits.filter(function (v) { return v > 0 && isPow10(v); }).length;
      return splits.map(function (v) {
        if (!(v > 0)) return "";
        var m = Math.round(v / Math.pow(10, Math.floor(Math.log10(v) + 1e-9)));
        return isPow10(v) || (decades < 3 && (m === 2 || m === 5)) ? tick(v) : "";
      });
    };
  }
  function chartOptions(spec, built, width) {
    var axes = [{ values: function (u, splits) { return splits.map(fmtStep); }, size: 30 }];
    (built.axes || [{ scale: "y", log: built.log }]).forEach(function (a) {
      var axis = {
        scale: a.scale, side: a.side == null ? 3 : a.side, size: 62, label: a.label, labelSize: a.label ? 16 : 0,
        grid: { show: a.side !== 1, stroke: "#eceef3" }, values: a.values || yTicks(a.log),
      };
      if (a.log) axis.filter = function (u, splits) { return splits; }; // yTicks picks the labels
      axes.push(axis);
    });
    axes[0].grid = { stroke: "#eceef3" };
    // a request for the whole data (the initial view, a double-click) gets the whole page's
    // step range, so that every chart, whatever its data, lines up; a zoom is honoured
    var scales = { x: { time: false, range: function (u, mn, mx) {
      var xs = u.data[0];
      return !xs.length || (mn <= xs[0] && mx >= xs[xs.length - 1]) ? FULL.slice() : [mn, mx];
    } } };
    Object.keys(built.scales).forEach(function (k) { scales[k] = built.scales[k]; });
    return {
      width: width, height: spec.height || 190,
      cursor: { sync: { key: SYNC.key, setSeries: false }, drag: { x: true, y: false, setScale: true }, points: { size: 6 } },
      legend: { live: true },
      scales: scales, axes: axes, bands: built.bands || [],
      series: [{ label: "step", value: function (u, v, si, idx) { return idx == null ? "–" : built.xLabel ? built.xLabel(idx) : stepLabel(idx); } }].concat(built.series),
      hooks: { setScale: [onScale], draw: [drawOverlays(spec)] },
    };
  }
  function panelWidth(node) { return Math.max(320, Math.floor(node.getBoundingClientRect().width) - 16); }

  function makePanel(container, spec) {
    var built0 = spec.build(false);
    if (!built0 || !built0.series.length) return null;
    var log = spec.log != null ? spec.log : false;
    var panel = el("div", "panel"); panel.id = "panel-" + spec.id;
    var head = el("div", "panel-head");
    head.appendChild(el("h3", null, spec.title));
    head.appendChild(el("span", "note", spec.note || ""));
    var toggle = el("button", log ? "scale on" : "scale", log ? "log" : "linear");
    toggle.type = "button"; toggle.title = "switch between a log and a linear " + (spec.toggles || "y") + " axis";
    head.appendChild(toggle);
    panel.appendChild(head);
    var plot = el("div", "plot");
    panel.appendChild(plot);
    container.appendChild(panel);
    function create() {
      if (charts[spec.id]) { charts[spec.id].destroy(); delete charts[spec.id]; }
      var built = spec.build(log);
      charts[spec.id] = new uPlot(chartOptions(spec, built, panelWidth(container)), built.data, plot);
      follow(charts[spec.id]);
      charts[spec.id].ggBox = container;
      charts[spec.id].ggRebuild = function () { charts[spec.id].setData(spec.build(log).data, false); };
    }
    toggle.addEventListener("click", function () {
      log = !log;
      toggle.textContent = log ? "log" : "linear";
      toggle.className = log ? "scale on" : "scale";
      create();
    });
    create();
    return panel;
  }

  function band(built, lo, hi, fill, label, edge) {
    built.data.push(hi, lo);
    var i = built.data.length - 2;
    built.series.push(
      { label: label + " max", class: "gg-quiet", stroke: edge || "transparent", width: edge ? 1 : 0, points: { show: false } },
      { label: label + " min", class: "gg-quiet", stroke: "transparent", width: 0, points: { show: false } });
    built.bands.push({ series: [i, i + 1], fill: fill });
  }
  function fresh(scales, log) { return { data: [X], series: [], bands: [], scales: scales, log: log }; }

  function lossPanel(log) {
    var built = fresh({ y: yScale(log) }, log);
    RUNS.forEach(function (r, ri) {
      var s = r.series; if (!s.loss_mean) return;
      var c = colour(ri), f = log ? positive : function (a) { return a; };
      band(built, f(s.loss_min), f(s.loss_max), alpha(c, 0.12), prefix(r) + "loss", alpha(c, 0.3));
      built.data.push(f(s.loss_mean));
      built.series.push({ label: prefix(r) + "loss", stroke: alpha(c, 0.45), width: 1, value: rangeValue(s.loss_min, s.loss_max) });
      built.data.push(f(ema(s.loss_mean, smoothing)));
      built.series.push({ label: prefix(r) + "smoothed", stroke: c, width: 2, value: plainValue });
    });
    return built;
  }
  function lrPanel(log) {
    var built = fresh({ y: yScale(log) }, log);
    RUNS.forEach(function (r, ri) {
      if (!r.series.lr) return;
      built.data.push(log ? positive(r.series.lr) : r.series.lr);
      built.series.push({ label: prefix(r) + "learning rate", stroke: colour(ri), width: 1.5, value: plainValue });
    });
    return built;
  }
  function normPanel(log) {
    var built = fresh({ y: yScale(log) }, log);
    RUNS.forEach(function (r, ri) {
      var s = r.series, c = colour(ri), f = log ? positive : function (a) { return a; };
      band(built, f(s.norm_min), f(s.norm_max), alpha(c, MULTI ? 0.15 : 0.28), prefix(r) + "norm", alpha(c, 0.55));
      built.data.push(f(s.norm_mean));
      built.series.push({ label: prefix(r) + "total norm", stroke: c, width: 1.3, value: rangeValue(s.norm_min, s.norm_max) });
      if (s.threshold) {
        built.data.push(f(s.threshold));
        built.series.push({ label: prefix(r) + "threshold", stroke: MULTI ? c : "#d62d2d", width: 1.5, dash: [6, 4], value: plainValue });
      }
      // clipped buckets as points, unless so many that they would merge into a band (the
      // clipping chart shows the rate)
      var marks = s.norm_max.map(function (v, i) { return s.clipped[i] > 0 && v != null && (!log || v > 0) ? v : null; });
      var marked = marks.filter(function (v) { return v != null; }).length;
      if (marked > 0 && marked <= Math.max(20, 0.05 * marks.length)) {
        built.data.push(marks);
        built.series.push({
          label: prefix(r) + "clipped", stroke: "#e08a00", fill: "#e08a00", width: 0, paths: function () { return null; },
          points: { show: true, size: 5, stroke: "#e08a00", fill: "#e08a00" },
          value: function (u, v, si, idx) { return idx == null || !s.clipped[idx] ? "–" : s.clipped[idx] + " of " + s.count[idx]; },
        });
      }
    });
    return built;
  }
  function clipPanel(log) {
    var built = fresh({ rate: { distr: 1, range: function (u, mn, mx) { return [0, mx > 0 ? mx * 1.15 : 1]; } }, coef: yScale(log) });
    built.axes = [
      { scale: "rate", label: "clip rate", values: function (u, splits) { return splits.map(function (v) { return Number((100 * v).toPrecision(3)) + "%"; }); } },
      { scale: "coef", side: 1, label: "clip coef (min)", log: log },
    ];
    RUNS.forEach(function (r, ri) {
      var s = r.series; if (!s.clip_rate) return;
      built.data.push(s.clip_rate);
      built.series.push({ label: prefix(r) + "clip rate (trailing " + s.clip_window + " steps)", scale: "rate", stroke: colour(ri), width: 1.5, value: pctValue });
      built.data.push(log ? positive(s.clip_coef) : s.clip_coef);
      built.series.push({ label: prefix(r) + "clip coefficient (min)", scale: "coef", stroke: alpha(colour(ri), 0.55), width: 1, dash: [3, 3], value: plainValue });
    });
    return built;
  }
  function scalePanel(log) {
    var built = fresh({ y: yScale(log, 2) }, log);
    built.axes = [{ scale: "y", values: function (u, splits) { return splits.map(tick); } }];
    RUNS.forEach(function (r, ri) {
      if (!r.series.loss_scale) return;
      built.data.push(log ? positive(r.series.loss_scale) : r.series.loss_scale);
      built.series.push({ label: prefix(r) + "loss scale (min)", stroke: colour(ri), width: 1.5, value: plainValue });
    });
    return built;
  }
  function dpNormPanel(log) {
    var built = fresh({ y: yScale(log) }, log);
    RUNS.forEach(function (r, ri) {
      var d = r.per_sample, c = colour(ri), f = log ? positive : function (a) { return a; };
      if (!d) return;
      var tag = d.exact.indexOf("quantiles") >= 0 ? " (not private)" : "";
      if (d.outer_low) band(built, f(d.outer_low), f(d.outer_high), alpha(c, 0.15), prefix(r) + "q" + d.outer.join("–q"));
      if (d.inner_low) band(built, f(d.inner_low), f(d.inner_high), alpha(c, 0.35), prefix(r) + "q0.25–q0.75");
      if (d.median) {
        built.data.push(f(d.median));
        built.series.push({ label: prefix(r) + "median per-example norm" + tag, stroke: c, width: 1.5, value: plainValue });
      }
      if (d.clip_norm) {
        built.data.push(f(d.clip_norm));
        built.series.push({ label: prefix(r) + "clip norm" + (d.exact.indexOf("clip_norm") >= 0 ? " (not private)" : ""), stroke: "#e3001b", width: 2, dash: [9, 4], value: plainValue });
      }
    });
    return built;
  }
  function dpFractionPanel(log) {
    var built = fresh({ y: { distr: 1, range: function (u, mn, mx) { return [0, mx > 0 ? Math.min(1, mx * 1.15) : 1]; } } });
    built.axes = [{ scale: "y", values: function (u, splits) { return splits.map(function (v) { return Number((100 * v).toPrecision(3)) + "%"; }); } }];
    RUNS.forEach(function (r, ri) {
      var d = r.per_sample; if (!d || !d.fraction_clipped) return;
      var tag = d.exact.indexOf("fraction_clipped") >= 0 ? " (not private)" : "";
      built.data.push(d.fraction_clipped);
      built.series.push({ label: prefix(r) + "fraction of examples clipped" + tag, stroke: colour(ri), width: 1.5, value: pctValue });
    });
    return built;
  }

  // ---------------------------------------------------------------- per-layer view
  var VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function scaleColour(t) {
    t = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1);
    var i = Math.min(VIRIDIS.length - 2, Math.floor(t)), f = t - i, a = VIRIDIS[i], b = VIRIDIS[i + 1];
    return "rgb(" + Math.round(a[0] + f * (b[0] - a[0])) + "," + Math.round(a[1] + f * (b[1] - a[1])) + "," + Math.round(a[2] + f * (b[2] - a[2])) + ")";
  }
  var LV = null; // the layer view's state
  var BAR_W = 190, TOP = 22, GAP = 8;

  function decode(b64) {
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Uint16Array(bytes.buffer);
  }
  function layerView(ri) {
    var L = RUNS[ri].layers, cols = L.start.length;
    var codes = decode(L.codes), span = L.hi - L.lo;
    var hasGroups = L.rows.some(function (r) { return r.group; });
    var open = {};
    L.rows.forEach(function (r, i) { if (r.group) open[i] = L.rows.length <= 60; });
    return {
      run: ri, L: L, cols: cols, col: cols - 1, row: null, open: open, hasGroups: hasGroups,
      value: function (row, c) {
        var code = codes[row * cols + c];
        if (code === 0) return 0;
        if (code === 65535) return Infinity;
        return Math.pow(10, L.lo + ((code - 1) / 65533) * span);
      },
    };
  }
  function visibleRows() {
    var out = [];
    LV.L.rows.forEach(function (r, i) { if (r.parent < 0 || LV.open[r.parent]) out.push(i); });
    return out;
  }
  function rowLabel(i) {
    var r = LV.L.rows[i];
    if (r.group) return (LV.open[i] ? "▾ " : "▸ ") + r.name + " (" + r.members + ")";
    if (r.parent >= 0) {
      var p = LV.L.rows[r.parent].name;
      var short = r.name.indexOf(p + ".") === 0 ? r.name.slice(p.length + 1) : r.name;
      return "    " + short;
    }
    return r.name;
  }
  function colLabel(c) {
    var L = LV.L, a = L.start[c], b = L.end[c], k = L.count[c];
    var last = c === LV.cols - 1 ? " (last snapshot)" : "";
    return (a === b ? "step " + a : "steps " + a + "–" + b + " (max of " + k + " snapshots)") + last;
  }
  function fit(ctx, s, width) {
    if (ctx.measureText(s).width <= width) return s;
    var lo = 0, hi = s.length;
    while (lo < hi) { var mid = (lo + hi) >> 1; if (ctx.measureText("…" + s.slice(mid)).width <= width) hi = mid; else lo = mid + 1; }
    return "…" + s.slice(lo);
  }
  function heatGeometry() {
    var box = document.getElementById("heatmap");
    var width = Math.max(600, Math.floor(box.getBoundingClientRect().width) - 2);
    var rows = visibleRows(), rowH = rows.length > 120 ? 10 : rows.length > 12 ? 14 : 20;
    var labelW = LV.labelW;
    return { width: width, rows: rows, rowH: rowH, plotL: labelW, plotW: width - labelW - BAR_W - GAP, height: TOP + rows.length * rowH + 4 };
  }
  function colX(g, step) {
    var r = xRange();
    return g.plotL + ((step - r[0]) / (r[1] - r[0] || 1)) * g.plotW;
  }
  function cellSpan(g, c) {
    var L = LV.L, x0 = colX(g, L.start[c]);
    var x1 = c + 1 < LV.cols ? colX(g, L.start[c + 1]) : colX(g, L.end[c]) + 3;
    return [x0, Math.max(x1, x0 + 2)];
  }
  function cellColour(v) {
    if (v === 0) return "#000";
    if (!isFinite(v)) return "#e00000";
    return scaleColour((Math.log10(v) - LV.L.lo) / (LV.L.hi - LV.L.lo));
  }
  function drawHeatmap() {
    if (!LV) return;
    var canvas = LV.canvas, g = heatGeometry();
    LV.geom = g;
    canvas.width = g.width * PX; canvas.height = g.height * PX;
    canvas.style.width = g.width + "px"; canvas.style.height = g.height + "px";
    var ctx = canvas.getContext("2d");
    ctx.setTransform(PX, 0, 0, PX, 0, 0);
    ctx.clearRect(0, 0, g.width, g.height);
    ctx.font = "11px system-ui, sans-serif"; ctx.textBaseline = "middle";
    ctx.fillStyle = "#334";
    var r = xRange();
    ctx.textAlign = "center";
    for (var t = 0; t <= 4; t++) {
      var step = r[0] + (t * (r[1] - r[0])) / 4, tx = colX(g, step);
      ctx.fillText(fmtStep(step), Math.min(Math.max(tx, g.plotL + 14), g.plotL + g.plotW - 14), 10);
      ctx.fillRect(tx, TOP - 5, 1, 4);
    }
    ctx.textAlign = "left"; ctx.fillText("step", 4, 10);
    ctx.textAlign = "right"; ctx.fillText(colLabel(LV.col).replace(" (max of", " (max,").replace(" snapshots)", ")"), g.width - 4, 10);
    ctx.textAlign = "left";
    ctx.save(); ctx.beginPath(); ctx.rect(g.plotL, TOP, g.plotW, g.rows.length * g.rowH); ctx.clip();
    for (var c = 0; c < LV.cols; c++) {
      var sp = cellSpan(g, c);
      if (sp[1] < g.plotL || sp[0] > g.plotL + g.plotW) continue;
      for (var k = 0; k < g.rows.length; k++) {
        ctx.fillStyle = cellColour(LV.value(g.rows[k], c));
        ctx.fillRect(sp[0], TOP + k * g.rowH, sp[1] - sp[0] + 0.5, g.rowH - (g.rowH > 10 ? 1 : 0));
      }
    }
    var sel = cellSpan(g, LV.col);
    ctx.strokeStyle = "#f2b705"; ctx.lineWidth = 2;
    ctx.strokeRect(sel[0] - 1, TOP, sel[1] - sel[0] + 2, g.rows.length * g.rowH);
    ctx.restore();
    var barL = g.plotL + g.plotW + GAP, barW = BAR_W - 70;
    g.rows.forEach(function (i, k) {
      var y = TOP + k * g.rowH + g.rowH / 2, r = LV.L.rows[i];
      if (i === LV.row) {
        ctx.fillStyle = "#fff3c4"; ctx.fillRect(0, y - g.rowH / 2, g.plotL - 2, g.rowH);
        ctx.strokeStyle = "#f2b705"; ctx.lineWidth = 1.5;
        ctx.strokeRect(g.plotL, y - g.rowH / 2, g.plotW, g.rowH);
      }
      ctx.fillStyle = r.group ? "#1d2330" : "#445";
      ctx.font = (r.group ? "600 " : "") + "11px system-ui, sans-serif";
      ctx.fillText(fit(ctx, rowLabel(i), g.plotL - 10), 4, y);
      var v = LV.value(i, LV.col);
      var t = v > 0 && isFinite(v) ? (Math.log10(v) - LV.L.lo) / (LV.L.hi - LV.L.lo) : v === 0 ? 0 : 1;
      ctx.fillStyle = isFinite(v) ? "#4a7fcf" : "#d62d2d";
      ctx.fillRect(barL, y - g.rowH / 2 + 2, Math.max(1, t * barW), g.rowH - 4);
      ctx.fillStyle = "#334"; ctx.font = "11px system-ui, sans-serif";
      ctx.fillText(fmt(v), barL + barW + 4, y);
    });
    LV.legend.textContent = "colour: log10 norm from 1e" + LV.L.lo + " (dark) to 1e" + LV.L.hi + " (yellow) · black: zero · red: non-finite · bars: norms " + colLabel(LV.col);
  }
  function hit(event) {
    var g = LV.geom, box = LV.canvas.getBoundingClientRect();
    var x = event.clientX - box.left, y = event.clientY - box.top;
    var k = Math.floor((y - TOP) / g.rowH);
    var row = k >= 0 && k < g.rows.length ? g.rows[k] : null, col = null;
    if (x >= g.plotL && x <= g.plotL + g.plotW) {
      for (var c = 0; c < LV.cols; c++) { var sp = cellSpan(g, c); if (x >= sp[0] && x < sp[1]) { col = c; break; } }
    }
    return { x: x, y: y, row: row, col: col, label: x < g.plotL };
  }
  function selectRow(i) {
    LV.row = i;
    var L = LV.L, name = L.rows[i].name, data = [L.start, L.start.map(function (a, c) { var v = LV.value(i, c); return v > 0 && isFinite(v) ? v : null; })];
    document.getElementById("history-title").textContent = "Norm history of " + (/^\d+$/.test(name) ? "layer " + name : name) + (MULTI ? " (" + RUNS[LV.run].label + ")" : "");
    if (charts.history) { charts.history.destroy(); delete charts.history; }
    var spec = { id: "history", height: 170 };
    var built = { data: data, scales: { y: yScale(true) }, bands: [], log: true,
      series: [{ label: name, stroke: colour(LV.run), width: 1.5, value: plainValue, points: { show: L.start.length < 200 } }],
      xLabel: function (c) { return colLabel(c); } };
    var box = document.getElementById("layer-history");
    charts.history = new uPlot(chartOptions(spec, built, panelWidth(box)), data, box);
    follow(charts.history);
    charts.history.ggBox = box;
    drawHeatmap();
  }
  function buildLayers() {
    var box = document.getElementById("heatmap"), controls = document.getElementById("layer-controls");
    var withLayers = RUNS.map(function (r, i) { return r.layers ? i : -1; }).filter(function (i) { return i >= 0; });
    if (!withLayers.length) {
      box.appendChild(el("p", "empty", "No per-layer snapshots were recorded."));
      document.getElementById("history-title").textContent = "";
      return;
    }
    LV = layerView(withLayers[0]);
    if (withLayers.length > 1) {
      var pick = el("select"); pick.id = "layer-run";
      withLayers.forEach(function (i) { var o = el("option", null, RUNS[i].label); o.value = String(i); pick.appendChild(o); });
      pick.addEventListener("change", function () { mountRun(+pick.value); });
      var lab = el("label", null, "run "); lab.appendChild(pick); controls.appendChild(lab);
    }
    var slider = el("input"); slider.type = "range"; slider.id = "layer-step"; slider.min = "0";
    var stepLab = el("label", null, "step "); stepLab.appendChild(slider); controls.appendChild(stepLab);
    var expand = el("button", null, "expand all"), collapse = el("button", null, "collapse all");
    expand.type = collapse.type = "button";
    controls.appendChild(expand); controls.appendChild(collapse);
    LV.legend = el("span", "hint"); controls.appendChild(LV.legend);
    var canvas = el("canvas"); canvas.id = "heatmap-canvas"; box.appendChild(canvas);
    var tip = el("div", "tip"); tip.style.display = "none"; box.appendChild(tip);
    function mountRun(ri) {
      var keep = { canvas: canvas, legend: LV.legend };
      LV = layerView(ri); LV.canvas = keep.canvas; LV.legend = keep.legend;
      var ctx = canvas.getContext("2d"), widest = 0;
      ctx.font = "600 11px system-ui, sans-serif";
      LV.L.rows.forEach(function (r, i) { widest = Math.max(widest, ctx.measureText(rowLabel(i)).width); });
      LV.labelW = Math.round(Math.min(320, Math.max(90, widest + 16)));
      slider.max = String(LV.cols - 1); slider.value = String(LV.col);
      expand.disabled = collapse.disabled = !LV.hasGroups;
      selectRow(defaultRow());
    }
    function defaultRow() {
      var best = 0, bestV = -1;
      LV.L.rows.forEach(function (r, i) { if (r.parent < 0) { var v = LV.value(i, LV.col); if (!isFinite(v)) v = Infinity; if (v > bestV) { best = i; bestV = v; } } });
      return best;
    }
    slider.addEventListener("input", function () { LV.col = +slider.value; drawHeatmap(); });
    expand.addEventListener("click", function () { Object.keys(LV.open).forEach(function (k) { LV.open[k] = true; }); drawHeatmap(); });
    collapse.addEventListener("click", function () { Object.keys(LV.open).forEach(function (k) { LV.open[k] = false; }); drawHeatmap(); });
    canvas.addEventListener("mousemove", function (e) {
      var h = hit(e);
      if (h.row == null) { tip.style.display = "none"; return; }
      var c = h.col != null ? h.col : LV.col;
      tip.textContent = LV.L.rows[h.row].name + " · " + colLabel(c) + " · norm " + fmt(LV.value(h.row, c));
      tip.style.display = "block";
      tip.style.left = Math.min(h.x + 14, LV.geom.width - 320) + "px"; tip.style.top = h.y + 12 + "px";
    });
    canvas.addEventListener("mouseleave", function () { tip.style.display = "none"; });
    canvas.addEventListener("click", function (e) {
      var h = hit(e);
      if (h.row == null) return;
      if (h.label && LV.L.rows[h.row].group) { LV.open[h.row] = !LV.open[h.row]; drawHeatmap(); return; }
      if (h.col != null) { LV.col = h.col; slider.value = String(h.col); }
      selectRow(h.row);
    });
    LV.canvas = canvas;
    mountRun(withLayers[0]);
  }

  // ---------------------------------------------------------------- findings
  function highlight(node) {
    var a = +node.getAttribute("data-start"), b = +node.getAttribute("data-end");
    api.highlight = { run: +node.getAttribute("data-run"), start: a, end: b };
    document.querySelectorAll(".finding.active").forEach(function (f) { f.classList.remove("active"); });
    node.classList.add("active");
    var pad = Math.max(b - a, (FULL[1] - FULL[0]) * 0.03, 10);
    zoomTo(Math.max(FULL[0], a - pad), Math.min(FULL[1], b + pad));
    Object.keys(charts).forEach(function (k) { charts[k].redraw(false); });
    var target = document.getElementById("charts");
    if (target.getBoundingClientRect().bottom < 0 || target.getBoundingClientRect().top > window.innerHeight) target.scrollIntoView({ block: "start" });
  }
  function bindFindings() {
    document.querySelectorAll(".finding[data-start]").forEach(function (node) {
      node.addEventListener("click", function () { highlight(node); });
      node.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); highlight(node); } });
    });
  }

  // ---------------------------------------------------------------- page
  function main() {
    var panels = document.getElementById("panels");
    if (!N) { panels.appendChild(el("p", "empty", "No steps were recorded.")); }
    else {
      var lossArrays = RUNS.map(function (r) { return r.series.loss_min; }).concat(RUNS.map(function (r) { return r.series.loss_max; }));
      var specs = [
        { id: "loss", title: "Loss", note: "raw (bucket mean, min–max band) and smoothed (EMA, slider above)", build: lossPanel, log: wantsLog(lossArrays) },
        { id: "norm", title: "Total gradient norm", note: "before clipping: mean with min–max band, threshold dashed, clipped steps in orange (when sparse), skipped steps dashed, non-finite red at the top", build: normPanel, log: true, marks: true, height: 230 },
        { id: "clip", title: "Clipping", note: "share of clipped steps (left) and the smallest clip coefficient (right)", build: clipPanel, log: true, toggles: "coefficient", height: 170 },
        { id: "lr", title: "Learning rate", build: lrPanel, log: wantsLog(RUNS.map(function (r) { return r.series.lr; })), height: 150 },
        { id: "scale", title: "AMP loss scale", build: scalePanel, log: true, height: 150 },
      ];
      specs.forEach(function (spec) { makePanel(panels, spec); });
      if (!charts.loss && !charts.lr) {
        panels.insertBefore(el("p", "empty", "No loss or learning rate was recorded (pass loss= to guard.step)."), panels.firstChild);
      }
      var dp = document.getElementById("dp-panels");
      if (dp) {
        makePanel(dp, { id: "dp-norm", title: "Per-example norm quantiles", note: "quantile bands, median and clip norm", build: dpNormPanel, log: true });
        makePanel(dp, { id: "dp-fraction", title: "Fraction of examples clipped", build: dpFractionPanel, log: false, height: 150 });
      }
    }
    buildLayers();
    bindFindings();
    document.getElementById("reset-zoom").addEventListener("click", function () { zoomTo(FULL[0], FULL[1]); });
    var slider = document.getElementById("smoothing"), out = document.getElementById("smoothing-value");
    slider.addEventListener("input", function () {
      smoothing = +slider.value; out.textContent = smoothing.toFixed(2);
      if (charts.loss) charts.loss.ggRebuild();
    });
    var pending = null;
    window.addEventListener("resize", function () {
      clearTimeout(pending);
      pending = setTimeout(function () {
        Object.keys(charts).forEach(function (k) {
          var c = charts[k]; c.setSize({ width: panelWidth(c.ggBox), height: c.height });
        });
        drawHeatmap();
      }, 100);
    });
    api.ready = true;
    api.renderMs = performance.now();
  }
  main();
})();
