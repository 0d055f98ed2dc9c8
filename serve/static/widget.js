/*
 * tunedesk customer-service chat widget.
 *
 *   <script src="https://your-host/widget.js" data-model="ft:..." data-key="wk-..." defer></script>
 *
 * Adds a chat bubble that streams answers from the same server's /v1/chat/completions.
 * Optional attributes: data-endpoint (API base, default: this script's origin + /v1),
 * data-title, data-greeting, data-system, data-placeholder, data-position ("right"|"left"),
 * data-color. The key in a public page is visible to anyone: use a widget key, which the
 * server limits to chat on named models and rate-limits.
 */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || window.__tunedeskWidget) return;
  window.__tunedeskWidget = true;

  var ds = script.dataset;
  var origin = new URL(script.src, window.location.href).origin;
  var cfg = {
    endpoint: (ds.endpoint || origin + "/v1").replace(/\/$/, ""),
    model: ds.model || "",
    key: ds.key || "",
    title: ds.title || "在线客服",
    greeting: ds.greeting || "您好！请问有什么可以帮您？",
    system: ds.system || "",
    placeholder: ds.placeholder || "输入您的问题…",
    position: ds.position === "left" ? "left" : "right",
    color: ds.color || "#2563eb",
    maxTokens: parseInt(ds.maxTokens || "256", 10),
  };
  // One salt per page view: the server's prefix cache then shares this visitor's conversation
  // with no other visitor (a cache hit is faster, which would tell one visitor what another
  // asked), while the system prompt, public in this page anyway, stays shared.
  var salt = Array.prototype.map
    .call(crypto.getRandomValues(new Uint8Array(16)), function (b) {
      return ("0" + b.toString(16)).slice(-2);
    })
    .join("");

  var host = document.createElement("div");
  host.id = "tunedesk-widget";
  var root = host.attachShadow({ mode: "open" });
  root.innerHTML =
    "<style>" +
    ":host{all:initial}" +
    "*{box-sizing:border-box;font-family:system-ui,-apple-system,'PingFang SC','Microsoft YaHei','Noto Sans CJK SC',sans-serif}" +
    ".bubble{position:fixed;bottom:20px;" + cfg.position + ":20px;width:56px;height:56px;border-radius:50%;border:none;background:" + cfg.color + ";color:#fff;font-size:26px;cursor:pointer;box-shadow:0 6px 20px rgba(0,0,0,.25);z-index:2147483646}" +
    ".panel{position:fixed;bottom:88px;" + cfg.position + ":20px;width:360px;max-width:calc(100vw - 40px);height:520px;max-height:calc(100vh - 120px);background:#fff;border-radius:14px;box-shadow:0 12px 40px rgba(0,0,0,.25);display:none;flex-direction:column;overflow:hidden;z-index:2147483647}" +
    ".panel.open{display:flex}" +
    ".head{background:" + cfg.color + ";color:#fff;padding:12px 16px;font-weight:600;display:flex;justify-content:space-between;align-items:center}" +
    ".head button{background:none;border:none;color:#fff;font-size:20px;cursor:pointer}" +
    ".log{flex:1;overflow-y:auto;padding:12px;background:#f7f8fa}" +
    ".msg{max-width:85%;margin:6px 0;padding:8px 12px;border-radius:12px;line-height:1.55;font-size:14px;white-space:pre-wrap;word-break:break-word}" +
    ".user{margin-left:auto;background:" + cfg.color + ";color:#fff;border-bottom-right-radius:4px}" +
    ".assistant{background:#fff;color:#1f2937;border:1px solid #e5e7eb;border-bottom-left-radius:4px}" +
    ".error{background:#fef2f2;color:#b91c1c;border:1px solid #fecaca}" +
    "form{display:flex;gap:8px;padding:10px;border-top:1px solid #e5e7eb}" +
    "input{flex:1;border:1px solid #d1d5db;border-radius:8px;padding:8px 10px;font-size:14px;outline:none}" +
    "input:focus{border-color:" + cfg.color + "}" +
    "form button{border:none;border-radius:8px;padding:8px 14px;background:" + cfg.color + ";color:#fff;cursor:pointer;font-size:14px}" +
    "form button.stop{background:#6b7280}" +
    "</style>" +
    "<button class='bubble' part='bubble' aria-label='open chat' title='" + cfg.title + "'>💬</button>" +
    "<div class='panel' role='dialog' aria-label='" + cfg.title + "'>" +
    "<div class='head'><span class='title'></span><button class='close' aria-label='close'>×</button></div>" +
    "<div class='log' aria-live='polite'></div>" +
    "<form><input name='q' autocomplete='off'><button type='submit' class='send'>发送</button></form>" +
    "</div>";

  var bubble = root.querySelector(".bubble");
  var panel = root.querySelector(".panel");
  var log = root.querySelector(".log");
  var form = root.querySelector("form");
  var input = root.querySelector("input");
  var sendBtn = root.querySelector(".send");
  root.querySelector(".title").textContent = cfg.title;
  input.placeholder = cfg.placeholder;

  var history = [];
  var controller = null;

  function add(role, text) {
    var div = document.createElement("div");
    div.className = "msg " + role;
    div.textContent = text;
    log.appendChild(div);
    log.scrollTop = log.scrollHeight;
    return div;
  }

  function setBusy(busy) {
    sendBtn.textContent = busy ? "停止" : "发送";
    sendBtn.className = busy ? "send stop" : "send";
  }

  bubble.addEventListener("click", function () {
    panel.classList.toggle("open");
    if (panel.classList.contains("open")) {
      if (!log.childElementCount) add("assistant", cfg.greeting);
      input.focus();
    }
  });
  root.querySelector(".close").addEventListener("click", function () {
    panel.classList.remove("open");
  });

  async function ask(question) {
    add("user", question);
    history.push({ role: "user", content: question });
    var out = add("assistant", "");
    out.classList.add("streaming");
    var answer = "";
    var messages = (cfg.system ? [{ role: "system", content: cfg.system }] : []).concat(history);
    controller = new AbortController();
    setBusy(true);
    try {
      var headers = { "Content-Type": "application/json" };
      if (cfg.key) headers.Authorization = "Bearer " + cfg.key;
      var res = await fetch(cfg.endpoint + "/chat/completions", {
        method: "POST",
        headers: headers,
        body: JSON.stringify({
          model: cfg.model,
          messages: messages,
          stream: true,
          max_tokens: cfg.maxTokens,
          cache_salt: salt,
          cache_share_system: true,
        }),
        signal: controller.signal,
      });
      if (!res.ok) {
        var body = await res.json().catch(function () { return {}; });
        throw new Error((body.error && body.error.message) || "HTTP " + res.status);
      }
      var reader = res.body.getReader();
      var decoder = new TextDecoder("utf-8");
      var buffer = "";
      for (;;) {
        var chunk = await reader.read();
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, { stream: true });
        var events = buffer.split("\n\n");
        buffer = events.pop();
        for (var i = 0; i < events.length; i++) {
          var line = events[i].trim();
          if (line.indexOf("data:") !== 0) continue;
          var data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          var payload = JSON.parse(data);
          if (payload.error) throw new Error(payload.error.message);
          var delta = payload.choices && payload.choices[0] && payload.choices[0].delta;
          if (delta && delta.content) {
            answer += delta.content;
            out.textContent = answer;
            log.scrollTop = log.scrollHeight;
          }
        }
      }
      history.push({ role: "assistant", content: answer });
    } catch (err) {
      if (err.name === "AbortError") {
        if (answer) history.push({ role: "assistant", content: answer });
      } else {
        out.classList.add("error");
        out.textContent = (answer ? answer + "\n" : "") + "⚠ " + err.message;
        history.pop();
      }
    } finally {
      out.classList.remove("streaming");
      out.classList.add("done");
      controller = null;
      setBusy(false);
    }
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    if (controller) { controller.abort(); return; }
    var q = input.value.trim();
    if (!q) return;
    input.value = "";
    ask(q);
  });

  function mount() { document.body.appendChild(host); }
  if (document.body) mount(); else document.addEventListener("DOMContentLoaded", mount);
  window.tunedeskWidget = { open: function () { if (!panel.classList.contains("open")) bubble.click(); }, root: root };
})();
