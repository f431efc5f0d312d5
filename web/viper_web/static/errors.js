// Errors as readable messages: what happened, in words, and what to do about it.

const TITLES = {
  invalid_argument: "That request was refused",
  not_found: "Not found",
  unauthenticated: "Please sign in",
  permission_denied: "Not allowed",
  resource_exhausted: "The server is busy, or the request is too large",
  failed_precondition: "Not possible yet",
  aborted: "Someone changed this meanwhile",
  unavailable: "The server is unavailable",
  deadline_exceeded: "That took too long",
  internal: "The server failed",
  unknown: "Something went wrong",
  unimplemented: "Not supported by this server",
};

const ADVICE = {
  unauthenticated: "Paste a sign-in token (your identity provider's JWT) at the top and try again; " +
    "for local use, `viper-server dev-token --user NAME` prints one.",
  permission_denied: "A sign-in token acts on its own user's profile only.",
  unavailable: "Its models may still be loading, or it is down: try again in a moment.",
  resource_exhausted: "Wait a little and try again, or send fewer or smaller images.",
  internal: "Try again; if it persists, give the request id to the operator.",
  deadline_exceeded: "Try again, perhaps with fewer images or steps.",
};

export function showError(error, context) {
  const box = document.getElementById("errors");
  const code = error.code || "unknown";
  const item = document.createElement("div");
  item.className = "error";
  item.dataset.code = code;
  const title = document.createElement("strong");
  title.textContent = `${context}: ${TITLES[code] || code}`;
  const text = document.createElement("p");
  text.className = "error-message";
  text.textContent = error.message || String(error);
  item.append(title, text);
  if (ADVICE[code]) {
    const advice = document.createElement("p");
    advice.textContent = ADVICE[code];
    item.append(advice);
  }
  if (error.requestId) {
    const id = document.createElement("p");
    id.className = "request-id";
    id.textContent = `request id ${error.requestId}`;
    item.append(id);
  }
  const close = document.createElement("button");
  close.type = "button";
  close.className = "dismiss";
  close.setAttribute("aria-label", "dismiss");
  close.textContent = "×";
  close.addEventListener("click", () => item.remove());
  item.append(close);
  box.append(item);
  item.scrollIntoView({block: "nearest"});
}

export function clearErrors() {
  document.getElementById("errors").replaceChildren();
}
