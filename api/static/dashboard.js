// The dashboard pages' charts (plotly.js, served by this server) and their refresh.
//
// The page says where its refreshing parts come from (data-panel-url: HTML; data-series-url:
// a ChartSet as JSON, see api/dashboard_data.py) and which range is chosen (data-range).
// Every value is formatted here, on the axes and in the hover labels alike: 45k, 1.2M,
// 250 ms, $1.2k, 2.5% (never "e+").
'use strict';

(function () {
  const page = document.getElementById('page');
  if (!page) return;
  const refreshMs = Number(page.dataset.refreshMs) || 5000;
  let range = page.dataset.range;
  let ticket = 0;

  function sig(v) {
    // Three significant digits, never in exponent notation, no thousands separator.
    return v.toLocaleString('en-US', {maximumSignificantDigits: 3, useGrouping: false});
  }

  function short(v) {
    v = Number(v.toPrecision(3));  // 999.9 rounds to 1000, shown as 1k
    const a = Math.abs(v);
    if (a >= 1e9) return sig(v / 1e9) + 'B';
    if (a >= 1e6) return sig(v / 1e6) + 'M';
    if (a >= 1e3) return sig(v / 1e3) + 'k';
    return sig(v);
  }

  function format(v, unit) {
    if (v === null || v === undefined || !isFinite(v)) return '–';
    switch (unit) {
      case 'ms': return Math.abs(v) >= 1000 ? sig(v / 1000) + ' s' : sig(v) + ' ms';
      case 'usd': return (v < 0 ? '-$' : '$') + short(Math.abs(v));
      case 'percent': return sig(v * 100) + '%';
      case 'ratio': return sig(v);
      default: return short(v);
    }
  }

  function niceTicks(top) {
    // Tick values 0, s, 2s, ... reaching top, with s = 1, 2 or 5 times a power of ten.
    if (!(top > 0)) top = 1;
    const raw = top / 4;
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map(m => m * power).find(s => s >= raw);
    const ticks = [];
    for (let v = 0; v < top + step * 0.999; v += step) ticks.push(Number(v.toPrecision(12)));
    return ticks;
  }

  function utc(ms) {
    // Plotly draws a date string without a zone as it is: the axes read in UTC, as the tiles do.
    return new Date(ms).toISOString().slice(0, 19).replace('T', ' ');
  }

  const COLORS = ['#2563eb', '#16a34a', '#9333ea', '#dc2626', '#ea580c'];
  const BASE = {
    margin: {l: 64, r: 16, t: 8, b: 36},
    font: {family: 'system-ui, sans-serif', size: 11, color: '#374151'},
    paper_bgcolor: '#fff',
    plot_bgcolor: '#fff',
    showlegend: true,
    legend: {orientation: 'h', x: 0, y: 1.12},
  };
  const CONFIG = {displayModeBar: false, responsive: true};

  function lineChart(chart, since, until) {
    const values = chart.lines.flatMap(l => l.y).filter(v => v !== null);
    // 5 % headroom, so the highest point does not touch the frame.
    const ticks = niceTicks(values.length ? Math.max(...values) * 1.05 : 0);
    const traces = chart.lines.map((l, i) => ({
      type: 'scatter',
      // Sparse series (a batch now and then) get markers, or a lone point would not show.
      mode: l.y.filter(v => v !== null).length <= 60 ? 'lines+markers' : 'lines',
      marker: {size: 6},
      name: l.name,
      x: l.x.map(utc),
      y: l.y,
      text: l.y.map(v => format(v, chart.unit)),
      hovertemplate: '%{text}',
      line: {color: COLORS[i % COLORS.length], width: 2, dash: l.dash},
      connectgaps: false,
    }));
    const layout = Object.assign({}, BASE, {
      hovermode: 'x unified',
      xaxis: {type: 'date', range: (chart.x_range || [since, until]).map(utc), gridcolor: '#f0f0f0',
              fixedrange: true},
      yaxis: {range: [0, ticks[ticks.length - 1]], tickvals: ticks,
              ticktext: ticks.map(v => format(v, chart.unit)), gridcolor: '#f0f0f0',
              zeroline: false, fixedrange: true, automargin: true},
    });
    return [traces, layout];
  }

  function funnelChart(chart) {
    const values = chart.lines[0].y;
    const text = values.map(v => format(v, chart.unit));
    const traces = [{
      type: 'funnel', y: chart.labels, x: values, text: text,
      textinfo: 'text+percent previous', hovertemplate: '%{y}: %{text}<extra></extra>',
      marker: {color: COLORS.slice(0, values.length)},
    }];
    const layout = Object.assign({}, BASE, {
      showlegend: false, hovermode: 'closest', margin: {l: 96, r: 16, t: 8, b: 8},
      xaxis: {visible: false, fixedrange: true}, yaxis: {fixedrange: true},
    });
    return [traces, layout];
  }

  function withPlotly(then) {
    if (window.Plotly) return then();
    let script = document.getElementById('plotly-js');
    if (!script) {
      script = document.createElement('script');
      script.id = 'plotly-js';
      script.src = page.dataset.plotlyUrl;
      document.head.appendChild(script);
    }
    script.addEventListener('load', then);
  }

  function draw(set) {
    if (!window.Plotly) return;  // not loaded yet: the first draw comes with it
    for (const chart of set.charts) {
      const el = document.getElementById(chart.id);
      if (!el) continue;
      const [traces, layout] = chart.kind === 'funnel'
        ? funnelChart(chart) : lineChart(chart, set.since, set.until);
      Plotly.react(el, traces, layout, CONFIG);
    }
    page.dataset.seriesRange = set.range;
    page.dataset.seriesSince = String(set.since);
  }

  async function get(url, kind) {
    if (!url) return null;
    const sep = url.includes('?') ? '&' : '?';
    const response = await fetch(range ? url + sep + 'range=' + range : url, {cache: 'no-store'});
    if (!response.ok) return null;
    return kind === 'json' ? response.json() : response.text();
  }

  async function refresh() {
    const mine = ++ticket;
    try {
      const [panel, series] = await Promise.all([
        get(page.dataset.panelUrl, 'text'), get(page.dataset.seriesUrl, 'json')]);
      if (mine !== ticket) return;  // a newer refresh (a range switch) overtook this one
      if (panel !== null) document.getElementById('panel').innerHTML = panel;
      if (series !== null) draw(series);
      page.dataset.refreshes = String(Number(page.dataset.refreshes || 0) + 1);
    } catch (e) {
      // Keep what is shown; the next tick tries again.
    }
  }

  async function loop() {
    await refresh();
    setTimeout(loop, refreshMs);
  }

  function choose(name) {
    range = name;
    page.dataset.range = name;
    for (const b of document.querySelectorAll('.ranges button')) {
      b.setAttribute('aria-pressed', String(b.dataset.range === name));
    }
    history.replaceState(null, '', '?range=' + encodeURIComponent(name));
    refresh();
  }

  for (const b of document.querySelectorAll('.ranges button')) {
    b.addEventListener('click', () => choose(b.dataset.range));
  }
  const initial = document.getElementById('initial-series');
  if (initial && page.dataset.plotlyUrl) {
    // After the first paint (a frame, then a task): the numbers show while plotly.js runs.
    requestAnimationFrame(() => setTimeout(() => withPlotly(() => {
      draw(JSON.parse(initial.textContent));
      performance.mark('charts-drawn');
    }), 0));
  }
  setTimeout(loop, refreshMs);
})();
