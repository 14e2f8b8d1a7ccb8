using System;

namespace Npcd
{
    /// <summary>Turns a LineRequest into a native npcd_request; the caller frees it.</summary>
    internal static class RequestBuilder
    {
        internal static IntPtr Build(LineRequest r)
        {
            if (string.IsNullOrEmpty(r.Persona)) throw new ArgumentException("Persona is empty", "request");
            if (r.Line == null) throw new ArgumentException("Line is null", "request");
            IntPtr p = NativeMethods.npcd_request_new(NativeMethods.Utf8(r.Persona), NativeMethods.Utf8(r.Line));
            if (p == IntPtr.Zero) throw new ArgumentException("Persona or Line was refused", "request");
            try
            {
                if (r.RequestId != null) Check(NativeMethods.npcd_request_set_id(p, NativeMethods.Utf8(r.RequestId)), "RequestId");
                if (r.Speaker != null) Check(NativeMethods.npcd_request_set_speaker(p, NativeMethods.Utf8(r.Speaker)), "Speaker");
                if (r.NpcId != null) Check(NativeMethods.npcd_request_set_npc_id(p, NativeMethods.Utf8(r.NpcId)), "NpcId");
                foreach (var turn in r.History)
                {
                    if (turn.Speaker == null || turn.Text == null) throw new ArgumentException("a History turn has a null field", "request");
                    Check(NativeMethods.npcd_request_add_history(p, NativeMethods.Utf8(turn.Speaker), NativeMethods.Utf8(turn.Text)), "History");
                }
                foreach (var entry in r.Context)
                {
                    if (entry.Value == null) throw new ArgumentException("Context[" + entry.Key + "] is null", "request");
                    Check(NativeMethods.npcd_request_set_context(p, NativeMethods.Utf8(entry.Key), NativeMethods.Utf8(entry.Value)), "Context");
                }
                if (r.Priority.HasValue) Check(NativeMethods.npcd_request_set_priority(p, (int)r.Priority.Value), "Priority");
                if (r.DeadlineMs.HasValue) Check(NativeMethods.npcd_request_set_deadline_ms(p, r.DeadlineMs.Value), "DeadlineMs");
                if (r.MaxTokens.HasValue) Check(NativeMethods.npcd_request_set_max_tokens(p, r.MaxTokens.Value), "MaxTokens");
                if (r.Temperature.HasValue) Check(NativeMethods.npcd_request_set_temperature(p, r.Temperature.Value), "Temperature");
                if (r.TopP.HasValue) Check(NativeMethods.npcd_request_set_top_p(p, r.TopP.Value), "TopP");
                if (r.TopK.HasValue) Check(NativeMethods.npcd_request_set_top_k(p, r.TopK.Value), "TopK");
                if (r.RepetitionPenalty.HasValue) Check(NativeMethods.npcd_request_set_repetition_penalty(p, r.RepetitionPenalty.Value), "RepetitionPenalty");
                if (r.Seed.HasValue) Check(NativeMethods.npcd_request_set_seed(p, r.Seed.Value), "Seed");
                foreach (var stop in r.Stop)
                {
                    if (stop == null) throw new ArgumentException("a Stop string is null", "request");
                    Check(NativeMethods.npcd_request_add_stop(p, NativeMethods.Utf8(stop)), "Stop");
                }
                if (r.Structured) Check(NativeMethods.npcd_request_set_structured(p, 1), "Structured");
                foreach (var action in r.Actions)
                {
                    if (string.IsNullOrEmpty(action.Name)) throw new ArgumentException("an action has no Name", "request");
                    Check(NativeMethods.npcd_request_add_action(p, NativeMethods.Utf8(action.Name),
                        NativeMethods.Utf8OrNull(action.Description), NativeMethods.Utf8OrNull(action.ArgsSchemaJson)), "Actions");
                }
                if (r.ResponseFormat != null) Check(NativeMethods.npcd_request_set_response_format(p, NativeMethods.Utf8(r.ResponseFormat)), "ResponseFormat");
                return p;
            }
            catch
            {
                NativeMethods.npcd_request_free(p);
                throw;
            }
        }

        private static void Check(int status, string field)
        {
            if (status != 0) throw new ArgumentException(field + " was refused (status " + status + ")", "request");
        }
    }
}
