// The sketch page: draw (mouse, touch, pen: Pointer Events) or drop an image, search the served model through the
// page server (same origin: /api/search/<version>), show the top-k as thumbnails; compare two versions.
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const canvas = $('canvas');
  const ctx = canvas.getContext('2d');
  const columns = [$('col-a'), $('col-b')];
  // `action` counts the user's actions (a stroke lifted, undo, clear, a file accepted, a version changed): a search
  // is started only for the latest one, so a drawing's debounced search never replaces a file chosen after it.
  const state = {meta: null, strokes: [], stroke: null, file: null, timer: 0, seq: 0, controllers: [], action: 0,
    unsearched: false};
  // What tests and bench/page.py read: per search, pen-up (or file chosen) -> results painted, and the HTTP part.
  const probe = window.semPcyc = {timings: [], sent: 0, shown: 0};

  // ------------------------------------------------------------------------------------------------ drawing
  function clearCanvas() {
    ctx.fillStyle = '#fff';
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  }

  function drawStroke(stroke, from) {
    const p = stroke.points;
    ctx.strokeStyle = ctx.fillStyle = '#000';
    ctx.lineWidth = stroke.width;
    ctx.lineCap = ctx.lineJoin = 'round';
    ctx.beginPath();
    if (p.length === 1) {
      ctx.arc(p[0][0], p[0][1], stroke.width / 2, 0, 2 * Math.PI);
      ctx.fill();
      return;
    }
    ctx.moveTo(...p[Math.max(0, from - 1)]);
    for (let i = Math.max(1, from); i < p.length; i++) ctx.lineTo(...p[i]);
    ctx.stroke();
  }

  function redraw() {
    clearCanvas();
    state.strokes.forEach((s) => drawStroke(s, 0));
  }

  function point(e) {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  }

  canvas.addEventListener('pointerdown', (e) => {
    if (!e.isPrimary || e.button > 0) return;
    e.preventDefault();
    try {
      canvas.setPointerCapture(e.pointerId);  // the stroke goes on when the pointer leaves the canvas
    } catch (err) { /* a pointer the browser no longer tracks: draw without capture */ }
    clearTimeout(state.timer);  // a new stroke before the debounce ends: one search, after this stroke
    state.stroke = {width: Number($('width').value), points: [point(e)], id: e.pointerId};
    state.strokes.push(state.stroke);
    drawStroke(state.stroke, 0);
  });

  canvas.addEventListener('pointermove', (e) => {
    const s = state.stroke;
    if (!s || e.pointerId !== s.id) return;
    const from = s.points.length;
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
    for (const c of events.length ? events : [e]) s.points.push(point(c));
    drawStroke(s, from);
  });

  function penUp(e) {
    const s = state.stroke;
    if (!s || e.pointerId !== s.id) return;
    state.stroke = null;
    performance.mark('sem-pcyc:pen-up');
    useDrawing(performance.now());
  }
  canvas.addEventListener('pointerup', penUp);
  canvas.addEventListener('pointercancel', penUp);

  function useDrawing(t0) {
    const action = ++state.action;
    setFile(null);
    clearTimeout(state.timer);
    if (!state.strokes.length) {  // nothing is ever sent for an empty canvas
      state.unsearched = false;
      cancelSearches();
      clearResults();
      setStatus('Draw something: it is searched when the pen lifts.');
      return;
    }
    state.unsearched = true;
    state.timer = setTimeout(() => canvas.toBlob((blob) => {
      if (action !== state.action) return;  // the user has done something since: that wins
      state.unsearched = false;
      search(blob, t0);
    }, 'image/png'), state.meta ? state.meta.debounce_ms : 50);
  }

  $('undo').addEventListener('click', undo);
  $('clear').addEventListener('click', () => {
    state.strokes = [];
    redraw();
    useDrawing(performance.now());
  });
  document.addEventListener('keydown', (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === 'z' && e.target.tagName !== 'INPUT') {
      e.preventDefault();
      undo();
    }
  });

  function undo() {
    state.strokes.pop();
    redraw();
    useDrawing(performance.now());
  }

  // ------------------------------------------------------------------------------------------- image files
  const pad = $('pad');
  ['dragenter', 'dragover'].forEach((type) => pad.addEventListener(type, (e) => {
    e.preventDefault();
    pad.classList.add('over');
  }));
  pad.addEventListener('dragleave', () => pad.classList.remove('over'));
  pad.addEventListener('drop', (e) => {
    e.preventDefault();
    pad.classList.remove('over');
    useFile(e.dataTransfer.files[0]);
  });
  // a file dropped beside the drawing area must not make the browser leave the page to open it
  window.addEventListener('dragover', (e) => e.preventDefault());
  window.addEventListener('drop', (e) => e.preventDefault());
  $('file').addEventListener('change', (e) => {
    useFile(e.target.files[0]);
    e.target.value = '';
  });

  async function useFile(file) {
    if (!file) {
      showError('Drop an image file (PNG or JPEG).');
      return;
    }
    const t0 = performance.now();
    const action = ++state.action;  // from now on the drawing's pending search (if any) is not started
    clearTimeout(state.timer);
    const checked = await checkFile(file);
    if (action !== state.action) return;  // the user drew, chose another file or undid meanwhile: that wins
    if (checked.problem) {
      showError(checked.problem + ' It was not sent.');
      if (state.unsearched) useDrawing(t0);  // the drawing's search this file stopped still goes out
      return;
    }
    setFile(file);
    search(new Blob([file], {type: checked.type}), t0);
  }

  function setFile(file) {
    const img = $('dropped');
    if (state.file === file) return;
    if (img.src) URL.revokeObjectURL(img.src);
    state.file = file;
    img.hidden = !file;
    if (file) img.src = URL.createObjectURL(file); else img.removeAttribute('src');
  }

  // The page server checks all of this again; checking here means a bad file never even leaves the browser.
  async function checkFile(file) {
    const meta = state.meta || {max_body_bytes: Infinity, max_pixels: Infinity};
    const name = file.name || 'The image';
    if (!file.size) return {problem: `${name} is empty.`};
    if (file.size > meta.max_body_bytes) {
      return {problem: `${name} is ${num(file.size)} bytes, over the ${num(meta.max_body_bytes)}-byte limit; ` +
        'choose a smaller image.'};
    }
    const head = new Uint8Array(await file.slice(0, 1 << 18).arrayBuffer());
    const info = imageInfo(head);
    if (!info) return {problem: `${name} is not a PNG or JPEG image; choose a .png or .jpg file.`};
    if (info.w * info.h > meta.max_pixels) {
      return {problem: `${name} is ${info.w}×${info.h} = ${num(info.w * info.h)} pixels, over the model's limit ` +
        `of ${num(meta.max_pixels)} pixels; scale it down.`};
    }
    return {type: info.type};
  }

  function imageInfo(b) {
    const view = new DataView(b.buffer);
    const png = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
    if (b.length >= 24 && png.every((v, i) => b[i] === v)) {
      return {type: 'image/png', w: view.getUint32(16), h: view.getUint32(20)};
    }
    if (b.length < 4 || b[0] !== 0xff || b[1] !== 0xd8 || b[2] !== 0xff) return null;
    for (let i = 2; i + 9 < b.length;) {  // JPEG: walk the segments to the frame header (SOFn)
      const marker = b[i + 1];
      if (b[i] !== 0xff || marker === 0xff) {
        i++;
      } else if (marker === 0x01 || marker === 0xd8 || (marker >= 0xd0 && marker <= 0xd7)) {
        i += 2;
      } else if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
        return {type: 'image/jpeg', w: view.getUint16(i + 7), h: view.getUint16(i + 5)};
      } else {
        i += 2 + view.getUint16(i + 2);
      }
    }
    return {type: 'image/jpeg', w: 0, h: 0};  // frame header beyond the first 256 KB: the page server checks it
  }

  // ------------------------------------------------------------------------------------------------ search
  function cancelSearches() {
    state.controllers.forEach((c) => c.abort());
    state.controllers = [];
    state.seq++;  // whatever is still on its way is stale now: only the newest search may paint
  }

  function versions() {
    const list = [$('ver-a').value.trim()];
    if ($('compare').checked) list.push($('ver-b').value.trim());
    return list;
  }

  async function search(blob, t0) {
    const wanted = versions();
    cancelSearches();
    const seq = state.seq;
    state.controllers = wanted.map(() => new AbortController());
    const signals = state.controllers.map((c) => c.signal);
    setStatus('Searching…');
    probe.sent++;
    const t1 = performance.now();
    const body = new Uint8Array(await blob.arrayBuffer());  // bytes, not a Blob: DevTools (and tests) can see them
    const answers = await Promise.all(wanted.map((v, i) => ask(v, body, blob.type, signals[i])));
    const httpMs = performance.now() - t1;
    if (seq !== state.seq || answers.some((a) => a.aborted)) return;  // stale: never over a newer one
    render(wanted, answers);
    afterPaint(() => {
      const total = performance.now() - t0;
      performance.measure('sem-pcyc:query-to-painted', {start: t0, duration: total});
      probe.timings.push({seq, total, http: httpMs});
      probe.shown = seq;
      setStatus(statusText(wanted, answers, total));
      showFirstResult();
    });
  }

  async function ask(version, body, type, signal) {
    if (!version) return {error: 'Choose a version to search.'};
    try {
      const resp = await fetch(`/api/search/${encodeURIComponent(version)}`,
        {method: 'POST', body, headers: {'Content-Type': type}, signal});
      const data = await resp.json().catch(() => null);
      if (resp.ok && Array.isArray(data)) return {items: data};
      const wait = resp.headers.get('Retry-After');
      if ((resp.status === 503 || resp.status === 429) && wait && !(data && data.error)) {
        return {error: `Busy: try again in ${wait} s.`};
      }
      return {error: (data && data.error) || `The page server answered ${resp.status}.`};
    } catch (err) {
      if (err.name === 'AbortError') return {aborted: true};
      return {error: `The page server at ${location.host} is not answering (${err.message}); is sempcyc still running?`};
    }
  }

  function research() {
    if (state.file) useFile(state.file);
    else if (state.strokes.length) useDrawing(performance.now());
  }
  $('compare').addEventListener('change', () => {
    $('ver-b').disabled = !$('compare').checked;
    research();
  });
  $('ver-a').addEventListener('change', research);
  $('ver-b').addEventListener('change', research);

  // The status line says what the results area shows: every version's results, or which version failed.
  function statusText(wanted, answers, total) {
    const ms = `${Math.round(total)} ms`;
    const failed = wanted.filter((v, i) => answers[i].error);
    if (!failed.length) return `${wanted.length === 2 ? 'Both versions' : 'Results'} in ${ms}.`;
    if (failed.length === wanted.length) return 'No results (the message is where they would be); your drawing is kept.';
    const ok = wanted.filter((v, i) => answers[i].items);
    return `Results of v${ok[0]} in ${ms}; v${failed[0]} gave none (see its message).`;
  }

  // On a phone the results start below the drawing: bring the first one into view (the least scrolling that does).
  function showFirstResult() {
    const first = document.querySelector('#results .grid li, #error:not([hidden])');
    if (!first) return;
    const r = first.getBoundingClientRect();
    const margin = 12;  // a little more than the tile, so a late layout change (a thumbnail in) keeps it in view
    const below = r.bottom + margin - window.innerHeight;
    if (below > 0) window.scrollBy({top: Math.min(below, r.top - margin), behavior: 'instant'});
    else if (r.top < 0) window.scrollBy({top: r.top - margin, behavior: 'instant'});
  }

  // ------------------------------------------------------------------------------------------------ results
  function render(wanted, answers) {
    const sets = answers.map((a) => new Set((a.items || []).map((item) => item.class)));
    const common = answers.length === 2 && answers.every((a) => a.items)
      ? new Set([...sets[0]].filter((c) => sets[1].has(c))) : new Set();
    columns.forEach((col, i) => {
      col.hidden = i >= wanted.length;
      if (!col.hidden) fillColumn(col, wanted[i], answers[i], common);
    });
    const agree = $('agree');
    agree.hidden = !(answers.length === 2 && answers.every((a) => a.items));
    agree.textContent = `The two versions agree on ${common.size} class${common.size === 1 ? '' : 'es'}` +
      (common.size ? `: ${[...common].join(', ')}.` : '.');
    const errors = answers.map((a, i) => a.error && (wanted.length > 1 ? `Version ${wanted[i]}: ` : '') + a.error);
    showError(errors.filter(Boolean).join('\n'));
  }

  function fillColumn(col, version, answer, common) {
    col.querySelector('h2').textContent = `${state.meta ? state.meta.model_name : ''} v${version}`;
    col.querySelector('.metrics').textContent = metricsText(version);
    col.dataset.version = version;
    col.querySelector('.grid').replaceChildren(...(answer.items || []).map((item) => tile(item, version, common)));
  }

  function tile(item, version, common) {
    const li = document.createElement('li');
    li.dataset.class = item.class;
    li.dataset.image = item.image;
    li.title = `${item.image} (score ${item.score})`;
    li.tabIndex = 0;  // reachable by Tab: the whole name is in the tile (it wraps) and read out on focus
    li.setAttribute('aria-label', `${item.class}, score ${item.score.toFixed(3)}, ${item.image}`);
    if (common.has(item.class)) li.className = 'agree';
    const img = document.createElement('img');
    img.alt = item.class;
    img.decoding = 'async';
    img.addEventListener('error', () => img.replaceWith(span('tile', item.class)));
    img.src = `/thumbs/${encodeURIComponent(version)}/${encodeURIComponent(item.image)}`;
    li.append(img, span('cls', item.class), span('score', item.score.toFixed(3)));
    return li;
  }

  function clearResults() {
    columns.forEach((col, i) => {
      col.querySelector('.grid').replaceChildren();
      if (i) col.hidden = true;
    });
    $('agree').hidden = true;
    showError('');
  }

  function metricsText(version) {
    const info = state.meta && state.meta.versions.find((v) => v.version === version);
    if (!info) return 'No archive of this version was given to the page: its metrics are unknown.';
    const m = info.metrics || {};
    const part = (label, s) => s ? `${label} mAP@all ${s.map_all}, P@10 ${s.p_at_10}` : '';
    const text = [part('zero-shot', m.zero_shot), part('generalised', m.generalised)].filter(Boolean).join(' · ');
    return (text || 'no evaluation metrics in the archive') + ` · top ${info.top_k}`;
  }

  // ------------------------------------------------------------------------------------------------ helpers
  function span(cls, text) {
    const el = document.createElement('span');
    el.className = cls;
    el.textContent = text;
    return el;
  }
  const num = (n) => n.toLocaleString('en-US');
  const setStatus = (text) => { $('status').textContent = text; };
  function showError(text) {
    $('error').hidden = !text;
    $('error').textContent = text;
  }
  const afterPaint = (fn) => requestAnimationFrame(() => setTimeout(fn, 0));

  async function loadMeta() {
    try {
      const resp = await fetch('/api/meta');
      state.meta = await resp.json();
    } catch (err) {
      showError(`Cannot load the model's details from the page server (${err.message}); is sempcyc running?`);
      return;
    }
    const m = state.meta;
    $('versions').replaceChildren(...m.versions.map((v) => new Option(v.version)));
    $('ver-a').value = m.default_version;
    $('ver-b').value = (m.versions[1] || m.versions[0]).version;
    const list = m.versions.map((v) => v.version).join(', ');
    $('model').textContent = `${m.model_name}, version${m.versions.length > 1 ? 's' : ''} ${list}, served by ` +
      `TorchServe at ${m.inference}`;
    await loadVersions();
    document.body.dataset.ready = 'true';
  }

  // The versions TorchServe has registered, as a list to choose from; where the page server cannot ask TorchServe
  // (`sempcyc ui` without --management-url), the text boxes stay and a note says why.
  async function loadVersions() {
    let data;
    try {
      data = await (await fetch('/api/versions')).json();
    } catch (err) {
      data = {versions: null, note: `the page server did not list TorchServe's versions (${err.message}): ` +
        'type the version'};
    }
    if (!data.versions || !data.versions.length) {
      $('version-note').hidden = false;
      $('version-note').textContent = `Versions: ${data.note || 'none registered'}.`;
      return;
    }
    const wanted = [$('ver-a').value, $('ver-b').value];
    ['ver-a', 'ver-b'].forEach((id, i) => {
      const old = $(id);
      const select = document.createElement('select');
      select.id = id;
      select.disabled = old.disabled;
      if (old.getAttribute('aria-label')) select.setAttribute('aria-label', old.getAttribute('aria-label'));
      select.append(...data.versions.map((v) => new Option(v)));
      select.value = data.versions.includes(wanted[i]) ? wanted[i] : (i ? data.versions[1] || data.versions[0]
        : data.default || data.versions[0]);
      select.addEventListener('change', research);
      old.replaceWith(select);
    });
  }

  clearCanvas();
  loadMeta();
})();
