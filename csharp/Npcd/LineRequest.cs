using System.Collections.Generic;

namespace Npcd
{
    /// <summary>One earlier turn of the conversation.</summary>
    public struct Turn
    {
        public string Speaker;
        public string Text;

        public Turn(string speaker, string text)
        {
            Speaker = speaker;
            Text = text;
        }
    }

    /// <summary>What an NPC is asked to answer. Unset (null) sampling values take the
    /// persona's defaults.</summary>
    public sealed class LineRequest
    {
        public string Persona;
        public string Line;
        public string Speaker;
        public string NpcId;
        /// <summary>Chosen by the client library when null.</summary>
        public string RequestId;
        public readonly List<Turn> History = new List<Turn>();
        public readonly Dictionary<string, string> Context = new Dictionary<string, string>();
        public Priority? Priority;
        public uint? DeadlineMs;
        public uint? MaxTokens;
        public float? Temperature;
        public float? TopP;
        public uint? TopK;
        public float? RepetitionPenalty;
        public ulong? Seed;
        public readonly List<string> Stop = new List<string>();

        public LineRequest(string persona, string line)
        {
            Persona = persona;
            Line = line;
        }
    }
}
