// Kakehashi staff web client: vanilla ES module, no build step.
// The access token lives in memory only; the refresh token in sessionStorage (this tab).
// The WebSocket authenticates with its first message, so no token appears in any URL.

const API = "/api/v1";
const TEXT = {
  ja: {
    app: "かけはし", lang_toggle: "English", logout: "ログアウト", login_title: "ログイン",
    login_id: "ログインID", password: "パスワード", login: "ログイン", rooms: "ルーム",
    choose_room: "ルームを選んでください", board: "お知らせ", readers: "既読者",
    close: "閉じる", message: "メッセージ", send: "送信", files: "添付ファイル",
    attach: "添付", upload: "アップロード", read_n: (n) => `既読 ${n}`,
    unread_n: (n) => `未読 ${n}`, uploaded: "アップロードしました", uploading: "送信中…",
    login_failed: "ログインできません", no_readers: "まだ誰も読んでいません",
    board_read: (r, m) => `既読 ${r} / 職員 ${m}`, download: "ダウンロード",
    offline: "接続が切れました。再接続しています…",
  },
  en: {
    app: "Kakehashi", lang_toggle: "日本語", logout: "Log out", login_title: "Log in",
    login_id: "Login ID", password: "Password", login: "Log in", rooms: "Rooms",
    choose_room: "Choose a room", board: "Announcements", readers: "Read by",
    close: "Close", message: "Message", send: "Send", files: "Attachments",
    attach: "Attach", upload: "Upload", read_n: (n) => `Read ${n}`,
    unread_n: (n) => `${n} unread`, uploaded: "Uploaded", uploading: "Uploading…",
    login_failed: "Could not log in", no_readers: "Nobody has read it yet",
    board_read: (r, m) => `read ${r} / staff ${m}`, download: "Download",
    offline: "Disconnected. Reconnecting…",
  },
};

const $ = (id) => document.getElementById(id);
const state = {
  lang: localStorage.getItem("kakehashi.lang") === "en" ? "en" : "ja",
  access: null, user: null, rooms: [], room: null, messages: new Map(), ws: null,
  refreshTimer: null, retry: 0,
};
const t = (key, ...args) => {
  const value = TEXT[state.lang][key];
  return typeof value === "function" ? value(...args) : value;
};

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function applyLanguage() {
  document.documentElement.lang = state.lang;
  for (const node of document.querySelectorAll("[data-t]")) node.textContent = t(node.dataset.t);
  document.title = t("app");
  if (state.room) $("room-title").textContent = state.room.name;
  renderRooms();
  for (const message of state.messages.values()) renderReceipt(message);
  if (state.room) loadBoard();
}

// --- HTTP ---------------------------------------------------------------------------

async function api(method, path, body, retried = false) {
  const headers = {};
  if (state.access) headers.Authorization = `Bearer ${state.access}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(API + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401 && !retried && path !== "/auth/login" && (await refresh())) {
    return api(method, path, body, true);
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw Object.assign(new Error(data.message || response.statusText), data);
  return data;
}

function room(id) {
  return `/rooms/${encodeURIComponent(id)}`;
}

function tokens(data) {
  state.access = data.access_token;
  state.user = data.user;
  sessionStorage.setItem("kakehashi.refresh", data.refresh_token);
  clearTimeout(state.refreshTimer);
  const soon = Math.max(10, data.expires_in - 60) * 1000;
  state.refreshTimer = setTimeout(refresh, soon);
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify({ type: "auth", access_token: state.access }));
  }
}

async function refresh() {
  const token = sessionStorage.getItem("kakehashi.refresh");
  if (!token) return false;
  try {
    const response = await fetch(`${API}/auth/refresh`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ refresh_token: token }),
    });
    if (!response.ok) throw new Error("refresh refused");
    tokens(await response.json());
    return true;
  } catch {
    sessionStorage.removeItem("kakehashi.refresh");
    return false;
  }
}

// --- login / logout -----------------------------------------------------------------

async function login(event) {
  event.preventDefault();
  $("login-error").textContent = "";
  try {
    tokens(await api("POST", "/auth/login", {
      login: $("login").value.trim(), password: $("password").value,
    }));
    $("password").value = "";
    await start();
  } catch (error) {
    $("login-error").textContent = `${t("login_failed")}: ${error.message}`;
  }
}

async function logout() {
  const token = sessionStorage.getItem("kakehashi.refresh");
  sessionStorage.removeItem("kakehashi.refresh");
  if (token) await api("POST", "/auth/logout", { refresh_token: token }).catch(() => {});
  location.reload();
}

async function start() {
  $("login-view").hidden = true;
  $("app-view").hidden = false;
  $("logout").hidden = false;
  $("me").textContent = `${state.user.display_name} (${state.user.municipality})`;
  await loadRooms();
  connect();
}

// --- rooms and timeline ---------------------------------------------------------------

async function loadRooms() {
  state.rooms = (await api("GET", "/rooms")).rooms;
  renderRooms();
}

function renderRooms() {
  const list = $("room-list");
  list.replaceChildren(...state.rooms.map((r) => {
    const unread = r.unread ? el("span", { class: "badge" }, t("unread_n", r.unread)) : "";
    const current = state.room && state.room.id === r.id;
    return el("li", {}, el("button", {
      type: "button", class: "room-button", "data-room": r.id,
      "aria-current": current ? "true" : "false", onclick: () => openRoom(r.id),
    }, el("span", {}, r.kind === "announcement" ? `📢 ${r.name}` : r.name), unread));
  }));
}

async function openRoom(id) {
  state.room = state.rooms.find((r) => r.id === id);
  state.messages.clear();
  $("room-title").textContent = state.room.name;
  $("timeline").replaceChildren();
  $("readers").hidden = true;
  $("composer").hidden = false;
  $("attach").hidden = false;
  const page = await api("GET", `${room(id)}/messages?limit=100`);
  for (const message of page.messages) addMessage(message);
  await Promise.all([markRead(), loadFiles(), loadBoard()]);
  renderRooms();
  $("text").focus();
}

function own(message) {
  return state.user && message.sender === state.user.id;
}

function addMessage(message) {
  if (state.messages.has(message.id)) return;
  state.messages.set(message.id, message);
  const files = (message.files || []).map((f) => el("div", {},
    el("button", { type: "button", class: "download", onclick: () => download(f) },
      `📎 ${f.name}`)));
  const item = el("li", { id: `m-${message.id}`, class: own(message) ? "own" : "" },
    el("div", { class: "meta" },
      `${message.sender_name} (${message.sender_municipality}) · `,
      new Date(message.time).toLocaleString(state.lang === "ja" ? "ja-JP" : "en-GB")),
    el("div", { class: "body" }, message.redacted ? "—" : message.text), ...files);
  if (own(message)) {
    item.append(el("button", {
      type: "button", class: "receipt", "aria-haspopup": "dialog",
      onclick: () => showReaders(message.id),
    }));
  }
  $("timeline").append(item);
  renderReceipt(message);
  $("timeline").scrollTop = $("timeline").scrollHeight;
}

function renderReceipt(message) {
  const button = document.querySelector(`#m-${message.id} .receipt`);
  if (button) button.textContent = t("read_n", message.read_count);
}

async function markRead() {
  const others = [...state.messages.values()].filter((m) => !own(m));
  if (!others.length || document.visibilityState === "hidden") return;
  const last = others[others.length - 1];
  await api("POST", `${room(state.room.id)}/read`, { up_to: last.id }).catch(() => {});
  state.room.unread = 0;
  renderRooms();
}

async function showReaders(id) {
  const data = await api("GET", `${room(state.room.id)}/messages/${id}/readers`);
  const items = data.readers.map((r) => el("li", {}, `${r.display_name} (${r.municipality})`));
  $("reader-list").replaceChildren(...(items.length ? items : [el("li", {}, t("no_readers"))]));
  $("readers").hidden = false;
  $("readers-close").focus();
}

async function send(event) {
  event.preventDefault();
  const text = $("text").value;
  if (!text.trim() || !state.room) return;
  $("send").disabled = true;
  // Cleared at once: the message can reach the timeline (over the WebSocket) before
  // the answer to this request does. If sending fails, the text comes back.
  $("text").value = "";
  try {
    const message = await api("POST", `${room(state.room.id)}/messages`, { text });
    addMessage(message);
  } catch (error) {
    if (!$("text").value) $("text").value = text;
    $("upload-status").textContent = error.message;
  } finally {
    $("send").disabled = false;
    $("text").focus();
  }
}

function composerKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
}

// --- announcement board ----------------------------------------------------------------

async function loadBoard() {
  const board = $("board");
  if (!state.room || state.room.kind !== "announcement") {
    board.hidden = true;
    return;
  }
  const data = await api("GET", `${room(state.room.id)}/announcements`);
  const rows = data.announcements.map((a) => el("tr", {},
    el("td", {}, a.message.text),
    el("td", {}, ...a.municipalities.map((m) =>
      el("div", {}, `${m.municipality}: ${t("board_read", m.read, m.members)}`)))));
  $("board-table").replaceChildren(...rows);
  board.hidden = false;
}

// --- files -----------------------------------------------------------------------------

async function loadFiles() {
  const data = await api("GET", `${room(state.room.id)}/files`);
  $("file-list").replaceChildren(...data.files.map((f) => el("li", {},
    el("button", { type: "button", class: "download", onclick: () => download(f) },
      `${t("download")}: ${f.name}`),
    ` (${f.size} B, ${f.uploader})`)));
}

async function upload() {
  const file = $("file").files[0];
  if (!file || !state.room) return;
  $("upload-status").textContent = t("uploading");
  const response = await fetch(`${API}${room(state.room.id)}/files`, {
    method: "POST", body: file,
    headers: {
      Authorization: `Bearer ${state.access}`,
      "Content-Disposition": `attachment; filename*=UTF-8''${encodeURIComponent(file.name)}`,
    },
  });
  const data = await response.json().catch(() => ({}));
  $("upload-status").textContent = response.ok ? t("uploaded") : data.message;
  $("file").value = "";
  await loadFiles();
}

async function download(file) {
  const query = `?room=${encodeURIComponent(state.room.id)}`;
  const response = await fetch(`${API}/files/${file.sha256}${query}`, {
    headers: { Authorization: `Bearer ${state.access}` },
  });
  if (!response.ok) {
    $("upload-status").textContent = (await response.json().catch(() => ({}))).message;
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", { href: url, download: file.name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// --- live events -------------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}${API}/events`);
  state.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify({ type: "auth", access_token: state.access }));
  ws.onmessage = (event) => onEvent(JSON.parse(event.data));
  ws.onclose = () => {
    if (state.ws !== ws) return;
    $("upload-status").textContent = t("offline");
    state.retry = Math.min(state.retry + 1, 5);
    setTimeout(async () => {
      await refresh();
      connect();
    }, 1000 * state.retry);
  };
}

function onEvent(event) {
  if (event.type === "ready") {
    state.retry = 0;
    document.body.dataset.live = "true";
    if (state.room) openRoom(state.room.id);
    return;
  }
  const current = state.room && event.room === state.room.id;
  if (event.type === "message") {
    if (current) {
      addMessage(event);
      if (!own(event)) markRead();
      if ((event.files || []).length) loadFiles();
      loadBoard();
    } else if (!own(event)) {
      const target = state.rooms.find((r) => r.id === event.room);
      if (target) target.unread = (target.unread || 0) + 1;
      renderRooms();
    }
  } else if (event.type === "receipt" && current) {
    const message = state.messages.get(event.id);
    if (message) {
      message.read_count = event.read_count;
      renderReceipt(message);
    }
    loadBoard();
  } else if (event.type === "edit" && current) {
    const node = document.querySelector(`#m-${event.id} .body`);
    if (node) node.textContent = event.text;
  } else if (event.type === "redact" && current) {
    const node = document.querySelector(`#m-${event.id} .body`);
    if (node) node.textContent = "—";
  } else if (event.type === "room") {
    loadRooms();
  }
}

// --- start ----------------------------------------------------------------------------------

$("login-form").addEventListener("submit", login);
$("logout").addEventListener("click", logout);
$("lang").addEventListener("click", () => {
  state.lang = state.lang === "ja" ? "en" : "ja";
  localStorage.setItem("kakehashi.lang", state.lang);
  applyLanguage();
});
$("composer").addEventListener("submit", send);
$("text").addEventListener("keydown", composerKey);
$("upload").addEventListener("click", upload);
$("readers-close").addEventListener("click", () => { $("readers").hidden = true; });
document.addEventListener("visibilitychange", () => { if (state.room) markRead(); });
applyLanguage();
if (await refresh()) await start();
