// Exchanges the token (from the URL's fragment, never sent to a server by the
// browser, or pasted) for a session cookie, then opens the console.
const status = document.getElementById("status");
const form = document.getElementById("login");
const input = document.getElementById("token");

async function login(token) {
  const res = await fetch("/login", {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ token }),
  });
  if (res.status === 204) {
    location.replace("/");
    return;
  }
  status.textContent = res.status === 401 ? "That token is not this console's." : `Login failed (HTTP ${res.status}).`;
  status.className = "error";
}

const fromUrl = location.hash.slice(1);
// the token leaves the address bar (and the history) at once
if (fromUrl) history.replaceState(null, "", "/login");
form.addEventListener("submit", (e) => {
  e.preventDefault();
  void login(input.value.trim());
});
if (fromUrl) void login(decodeURIComponent(fromUrl));
