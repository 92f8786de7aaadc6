/** The CLI talks to the daemon through the exported client's HTTP layer. */
export { ApiClient } from "../client/http.js";
